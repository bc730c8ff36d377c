"""M8: the approval round trip. A session with `"approvals": "ask"`; its Claude Code asks to run a Bash command;
from the `approval.requested` event arriving at a WebSocket client, through the answer POSTed by that client, to
the command starting in the container (the command's first act is to write the time, in nanoseconds: container
and host share one clock)."""
from __future__ import annotations

import time

from bench.stack import next_frame
from bench.stats import Figure, summary

STAMP = "/tmp/ccd-bench-tool-started"


def measure(bench, runs: int) -> Figure:
    sid = bench.new_session({"approvals": "ask"})["id"]
    ws = bench.socket(sid)
    container = bench.container_of(sid)
    samples = []
    try:
        for i in range(runs + 1):  # the first turn starts the process and is not counted
            turn = bench.call("POST", f"/sessions/{sid}/chat", 202,
                              json={"prompt": f"RUN: date +%s%N > {STAMP}; echo {i}"})
            while True:
                frame = next_frame(ws)
                if frame.get("turn_id") == turn["id"] and frame["type"] == "approval.requested":
                    arrived = time.time_ns()
                    bench.call("POST", f"/turns/{turn['id']}/approvals/{frame['data']['request_id']}", 200,
                               json={"behavior": "allow"})
                elif frame.get("turn_id") == turn["id"] and frame["type"] in ("turn.completed", "turn.failed"):
                    if frame["type"] != "turn.completed":
                        raise RuntimeError(f"turn failed: {frame['data']}")
                    break
            code, out = container.exec_run(["cat", STAMP], user="agent")
            if code != 0:
                raise RuntimeError(f"the approved command did not run: {out!r}")
            if i >= 1:
                samples.append((int(out.strip()) - arrived) / 1e6)
    finally:
        ws.close()
    found = summary(samples)
    return Figure(id="M8", what="approval round trip: approval.requested at a WebSocket client -> answer POSTed "
                                "-> the tool's command starts", unit="ms", ours=found,
                  target="p50 <= 50 ms", met=found["median"] <= 50)
