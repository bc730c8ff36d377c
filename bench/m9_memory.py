"""M9: memory. What one idle hot session holds (its container's memory, and the resident size of its Claude Code
process), and so how many idle hot sessions a 24 GiB host holds."""
from __future__ import annotations

import time

from bench.stats import Figure, summary

HOST_MIB = 24 * 1024


def claude_rss_mib(container) -> float:
    """The resident memory of the container's long-lived Claude Code, MiB (from `ps` on the host)."""
    top = container.top(ps_args="-eo pid,rss,args")
    rows = [row for row in top["Processes"] if "--input-format stream-json" in row[-1]]
    if not rows:
        raise RuntimeError("no hot Claude Code in the container")
    return sum(int(row[1]) for row in rows) / 1024


def container_mib(container) -> float:
    stats = container.stats(stream=False)["memory_stats"]
    usage = stats.get("usage", 0) - (stats.get("stats") or {}).get("inactive_file", 0)
    return usage / 2**20


def measure(bench, sessions: int) -> list[Figure]:
    rss, held = [], []
    for _ in range(sessions):
        sid = bench.new_session()["id"]
        for word in ("one", "two"):
            turn = bench.call("POST", f"/sessions/{sid}/chat", 202, json={"prompt": f"SAY: {word}"})
            deadline = time.monotonic() + 120
            while bench.call("GET", f"/turns/{turn['id']}")["status"] in ("queued", "running"):
                if time.monotonic() > deadline:
                    raise RuntimeError("turn did not finish")
                time.sleep(0.05)
        time.sleep(1.0)  # idle now
        container = bench.container_of(sid)
        rss.append(claude_rss_mib(container))
        held.append(container_mib(container))
    r, c = summary(rss), summary(held)
    return [Figure(id="M9", what="memory of one idle hot session: its container (Claude Code's RSS in derived)",
                   unit="MiB", ours=c, target="reported",
                   derived={"claude RSS MiB p50": r["median"],
                            "idle hot sessions per 24 GiB (by container)": int(HOST_MIB // c["median"]),
                            "by Claude Code's RSS": int(HOST_MIB // r["median"])})]
