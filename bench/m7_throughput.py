"""M7: throughput. Many short turns over as many sessions as the worker runs at once, all queued up front; turns
completed per minute, beside the same turns run directly in the same containers in parallel: by long-lived Claude
Code processes over stdin (one per container), and by `docker exec … claude -p` (today's engine's cost: it paid a
Claude Code start per turn, as `claude -p` does)."""
from __future__ import annotations

import threading
import time

import json
from pathlib import Path

from bench.direct import DirectHotTurns, DirectTurns
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


def direct(runners: list, per_session: int, parallel: bool) -> float:
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
    long_lived = [DirectHotTurns(bench, sid) for sid in sessions]
    for runner in runners + long_lived:
        runner.run(PROMPT)  # start the direct conversations, as the API's first turns below start theirs
    ours(bench, sessions, 1)
    mine, hot, par = [], [], []
    try:
        for _ in range(rounds):
            mine.append(ours(bench, sessions, per_session))
            hot.append(direct(long_lived, per_session, parallel=True))
            par.append(direct(runners, per_session, parallel=True))
    finally:
        for runner in long_lived:
            runner.close()
    o, h, p = worst_round(mine), worst_round(hot), worst_round(par)
    before = stored_figure()
    derived = {"direct claude -p parallel turns/min": p["median"], "ours / claude -p": o["median"] / p["median"]}
    met = o["median"] >= 0.9 * h["median"]
    if before:
        derived["ours / before (stored)"] = o["median"] / before
        met = met and o["median"] >= 5 * before
    return Figure(id="M7", what=f"throughput: {len(sessions)} sessions x {per_session} short turns, turns/min",
                  unit="turns/min", ours=o, baseline=h, baseline_name="direct long-lived, parallel",
                  target=">= 0.9x direct long-lived, >= 5x before", met=met, derived=derived,
                  notes="for a rate the p99 column holds the slowest round (higher is better); `before` is the "
                        "M7 figure of the engine with a process per turn, from the committed bench/results.json")


BEFORE_ENGINE = "per-turn"  # results.json's M7 figures from before hot sessions carry no marker; newer ones this


def stored_figure() -> float | None:
    """M7 of the engine that started Claude Code for every turn (bench/results.json as committed before hot
    sessions, kept under "before_hot" once a newer run has replaced the figures)."""
    path = Path(__file__).with_name("results.json")
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(results.get("before_hot"), dict):
        return results["before_hot"].get("M7")
    for figure in results.get("figures", []):
        if figure.get("id") == "M7" and figure.get("baseline_name") == "direct, parallel":
            return (figure.get("ours") or {}).get("median")
    return None


def worst_round(rates: list[float]) -> dict:
    """A rate's summary, where the tail that matters is the slowest round."""
    found = summary(rates)
    return {**found, "p99": found["min"]}
