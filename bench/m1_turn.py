"""M1: turn overhead. POST chat → the turn's last event on a WebSocket client, beside the same turn run directly
with `docker exec … claude -p` in the same container, alternating one with the other."""
from __future__ import annotations

import time

from bench.direct import DirectTurns
from bench.stack import receive_until
from bench.stats import Figure, summary

SCRIPTS = {"text": "SAY: benchmark turn", "bash": "RUN: echo bench"}


def measure(bench, runs: int, script: str = "text") -> Figure:
    prompt = SCRIPTS[script]
    session = bench.new_session()
    sid = session["id"]
    direct = DirectTurns(bench, sid)
    ws = bench.socket(sid)
    ours, baseline = [], []
    try:
        for i in range(runs + 2):  # the first pair warms both conversations and is not counted
            start = time.monotonic()
            turn = bench.call("POST", f"/sessions/{sid}/chat", 202, json={"prompt": prompt})
            final, arrived = receive_until(ws, turn["id"])
            if final["type"] != "turn.completed":
                raise RuntimeError(f"turn failed: {final['data']}")
            wall = arrived - start
            direct_wall = direct.run(prompt)
            if i >= 2:
                ours.append(wall * 1000)
                baseline.append(direct_wall * 1000)
    finally:
        ws.close()
    o, b = summary(ours), summary(baseline)
    added_p50, added_p99 = o["median"] - b["median"], o["p99"] - b["p99"]
    return Figure(id="M1" if script == "text" else "M1-bash",
                  what=f"turn: POST chat -> last event on a WebSocket ({script} turn)", unit="ms",
                  ours=o, baseline=b, baseline_name="docker exec claude -p",
                  target="added <= 50 ms p50, <= 150 ms p99",
                  met=added_p50 <= 50 and added_p99 <= 150,
                  derived={"added p50 ms": added_p50, "added p99 ms": added_p99})
