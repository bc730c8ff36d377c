"""M7: throughput. Many short turns over as many sessions as the worker runs at once, all queued up front; turns
completed per minute, beside the same turns run directly with docker exec, one at a time and in parallel."""
from __future__ import annotations

import threading
import time

from bench.direct import DirectTurns
from bench.stack import next_frame
from bench.stats import Figure, summary

PROMPT = "SAY: short"


def ours(bench, sessions: list[str], per_session: int) -> float:
    """Turns per minute through the API: every chat POSTed at once, until the last one has finished (seen on
    each session's WebSocket, so that watching costs the service no polling)."""
    sockets = {sid: bench.socket(sid) for sid in sessions}
    start = time.monotonic()
    turns = [bench.call("POST", f"/sessions/{sid}/chat", 202, json={"prompt": PROMPT})["id"]
             for _ in range(per_session) for sid in sessions]
    for sid, ws in sockets.items():
        finished = 0
        while finished < per_session:
            frame = next_frame(ws)
            if frame["type"] in ("turn.failed", "turn.cancelled"):
                raise RuntimeError(f"turn {frame['turn_id']} of session {sid}: {frame['data']}")
            finished += frame["type"] == "turn.completed"
        ws.close()
    return len(turns) / (time.monotonic() - start) * 60


def direct(runners: list[DirectTurns], per_session: int, parallel: bool) -> float:
    """Turns per minute run straight in the containers: one thread per container, or all in one thread."""
    start = time.monotonic()
    if parallel:
        threads = [threading.Thread(target=lambda r=r: [r.run(PROMPT) for _ in range(per_session)]) for r in runners]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for runner in runners:
            for _ in range(per_session):
                runner.run(PROMPT)
    return len(runners) * per_session / (time.monotonic() - start) * 60


def measure(bench, rounds: int, per_session: int = 8) -> Figure:
    sessions = [bench.new_session()["id"] for _ in range(bench.worker_concurrency)]
    runners = [DirectTurns(bench, sid) for sid in sessions]
    for runner in runners:
        runner.run(PROMPT)  # start the direct conversations, as the API's first turns below start theirs
    ours(bench, sessions, 1)
    mine, par, seq = [], [], []
    for _ in range(rounds):
        mine.append(ours(bench, sessions, per_session))
        par.append(direct(runners, per_session, parallel=True))
        seq.append(direct(runners[:1], per_session, parallel=False))
    o, p, s = worst_round(mine), worst_round(par), worst_round(seq)
    return Figure(id="M7", what=f"throughput: {len(sessions)} sessions x {per_session} short turns, turns/min",
                  unit="turns/min", ours=o, baseline=p, baseline_name="direct, parallel",
                  target=">= 0.9x direct parallel", met=o["median"] >= 0.9 * p["median"],
                  derived={"direct sequential turns/min": s["median"]},
                  notes="for a rate the p99 column holds the slowest round (higher is better)")


def worst_round(rates: list[float]) -> dict:
    """A rate's summary, where the tail that matters is the slowest round."""
    found = summary(rates)
    return {**found, "p99": found["min"]}
