"""M1: turn overhead. POST chat → the turn's last event on a WebSocket client (a follow-up turn, served by the
session's hot Claude Code), beside the same turn run in the same container by a direct long-lived Claude Code
driven over stdin (what the Agent SDK's client does) and by a direct `docker exec … claude -p`, in turn.
M1-cold: a session's first turn, when its Claude Code has yet to start, beside the direct `claude -p`."""
from __future__ import annotations

import time

from bench.direct import DirectHotTurns, DirectTurns
from bench.stack import receive_until
from bench.stats import Figure, summary

SCRIPTS = {"text": "SAY: benchmark turn", "bash": "RUN: echo bench"}


def our_turn(bench, ws, sid: str, prompt: str) -> float:
    """One turn through the API; seconds from the POST to its final event on the WebSocket."""
    start = time.monotonic()
    turn = bench.call("POST", f"/sessions/{sid}/chat", 202, json={"prompt": prompt})
    final, arrived = receive_until(ws, turn["id"])
    if final["type"] != "turn.completed":
        raise RuntimeError(f"turn failed: {final['data']}")
    return arrived - start


def measure(bench, runs: int, script: str = "text") -> list[Figure]:
    prompt = SCRIPTS[script]
    sid = bench.new_session()["id"]
    direct, hot = DirectTurns(bench, sid), DirectHotTurns(bench, sid)
    ws = bench.socket(sid)
    ours, baseline, long_lived = [], [], []
    try:
        for i in range(runs + 2):  # the first two rounds start every conversation and process, and are not counted
            wall = our_turn(bench, ws, sid, prompt)
            direct_wall = direct.run(prompt)
            hot_wall = hot.run(prompt)
            if i >= 2:
                ours.append(wall * 1000)
                baseline.append(direct_wall * 1000)
                long_lived.append(hot_wall * 1000)
    finally:
        ws.close()
        hot.close()
    o, b, h = summary(ours), summary(baseline), summary(long_lived)
    added_p50, added_p99 = o["median"] - h["median"], o["p99"] - h["p99"]
    vs_p = o["median"] / b["median"]
    suffix = "" if script == "text" else "-bash"
    return [
        Figure(id=f"M1{suffix}", what=f"follow-up turn: POST chat -> last event on a WebSocket ({script} turn), "
                                     "ours hot vs a direct long-lived Claude Code", unit="ms",
               ours=o, baseline=h, baseline_name="direct long-lived claude (stdin)",
               target="added <= 15 ms p50, <= 50 ms p99", met=added_p50 <= 15 and added_p99 <= 50,
               derived={"added p50 ms": added_p50, "added p99 ms": added_p99}),
        Figure(id=f"M1{suffix}-vs-p", what=f"the same turns, ours hot vs a direct `claude -p` ({script} turn)",
               unit="ms", ours=o, baseline=b, baseline_name="docker exec claude -p",
               target="<= 0.15x p50", met=vs_p <= 0.15,
               derived={"ours / claude -p p50": vs_p, "long-lived / claude -p p50": h["median"] / b["median"]}),
    ]


def measure_cold(bench, runs: int) -> Figure:
    """A new session's first turn (its Claude Code starts for it), beside a direct `claude -p` in its container."""
    prompt = SCRIPTS["text"]
    ours, baseline = [], []
    for _ in range(runs):
        sid = bench.new_session()["id"]
        ws = bench.socket(sid)
        try:
            ours.append(our_turn(bench, ws, sid, prompt) * 1000)
        finally:
            ws.close()
        baseline.append(DirectTurns(bench, sid).run(prompt) * 1000)
    o, b = summary(ours), summary(baseline)
    added = o["median"] - b["median"]
    return Figure(id="M1-cold", what="a session's first turn (no Claude Code yet): POST chat -> last event",
                  unit="ms", ours=o, baseline=b, baseline_name="docker exec claude -p",
                  target="no slower than M1 was (<= 50 ms added p50)", met=added <= 50,
                  derived={"added p50 ms": added})
