"""M5: fan-out. N WebSocket clients (in separate load-generator processes) tail 10 sessions while events are
published into those sessions' streams at a steady rate; delivery latency at the clients, memory per idle client
and the web tier's CPU."""
from __future__ import annotations

import json
import subprocess
import sys
import time

from core.envelope import Event
from bench.procs import cpu_seconds, rss_bytes, tree
from bench.stats import Figure, summary

SESSIONS = 10
PAD = "x" * 400  # about the size of a streamed text delta's line


def start_clients(bench, count: int, sessions: list[str], generators: int = 2) -> list[subprocess.Popen]:
    procs = []
    for g in range(generators):
        share = count // generators + (1 if g < count % generators else 0)
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.fanout_clients", bench.ws_base, bench.token,
                                       str(share), *sessions], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      text=True))
    for proc in procs:
        line = proc.stdout.readline()
        if not line.startswith("connected"):
            raise RuntimeError(f"a load generator failed: {line or proc.stderr}")
    return procs


def publish(bench, sessions: list[str], rate: float, seconds: float) -> int:
    """`rate` events per second into each session's stream for `seconds`, the sessions' events spread evenly in
    time (they are independent turns); returns how many each got."""
    each, start = int(rate * seconds), time.monotonic()
    step = 1 / (rate * len(sessions))
    for i in range(each * len(sessions)):
        time.sleep(max(0.0, start + i * step - time.monotonic()))
        bench.events.publish(Event(session_id=sessions[i % len(sessions)], type="claude.stream_event",
                                   data={"type": "stream_event", "bench_sent": time.time(), "n": i, "pad": PAD}))
    return each


def measure(bench, clients: int, rate: float = 5.0, seconds: float = 20.0) -> Figure:
    sessions = [bench.new_session()["id"] for _ in range(SESSIONS)]
    web = tree(bench.processes[1].proc.pid)
    idle_before = rss_bytes(web)
    procs = start_clients(bench, clients, sessions)
    time.sleep(3)  # let the sockets settle before reading memory
    per_client = (rss_bytes(web) - idle_before) / clients
    cpu_before = cpu_seconds(web)
    sent = publish(bench, sessions, rate, seconds)
    web_cpu = (cpu_seconds(web) - cpu_before) / seconds
    time.sleep(2)  # what is in flight arrives
    latencies, counts, closed = [], [], 0
    for proc in procs:
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        report = json.loads(proc.stdout.readline())
        latencies += report["latencies"]
        counts += report["counts"]
        closed += report["closed_early"]
        proc.wait(30)
    delivered = sum(counts) / (sent * clients)
    o = summary(latencies)
    return Figure(id="M5" if clients >= 1000 else f"M5-{clients}",
                  what=f"fan-out: {clients} WebSocket clients on {SESSIONS} sessions, {rate:g} events/s each",
                  unit="ms", ours=o, target="1,000 clients, p99 <= 100 ms" if clients >= 1000 else "",
                  met=(o.get("p99", 1e9) <= 100 and delivered >= 0.999) if clients >= 1000 else None,
                  derived={"delivered %": delivered * 100, "deliveries/s": sent / seconds * clients,
                           "KiB per idle client": per_client / 1024, "web CPU cores": web_cpu,
                           "closed early": closed})
