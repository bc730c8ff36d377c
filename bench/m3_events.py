"""M3: the event pipeline. A session container prints 1 KB lines (as fast as it can, then paced at 100/s); the
worker's reader and batched publisher carry them to Redis, the web tier to a WebSocket client. Beside it: a
redis-py XADD → XREAD BLOCK loop of the same payloads."""
from __future__ import annotations

import json
import threading
import time
import uuid

import redis

from bench.stack import SlowClient, next_frame
from bench.stats import Figure, summary
from core.claimed import ClaimedSession, ClaimedTurn
from workers.publisher import Publisher
from workers.turn_output import TurnOutput

PAYLOAD = 1000  # bytes of padding: each line is about 1 KB
# Runs in the container: N wrapper records ("<n>\t<json>"), each stamped with the time it was printed.
EMITTER = """
import json, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
pad, start, out = "x" * %d, time.time(), sys.stdout
for i in range(1, n + 1):
    if rate:
        time.sleep(max(0.0, start + i / rate - time.time()))
    out.write(str(i) + "\\t" + json.dumps({"type": "stream_event", "sent": time.time(), "pad": pad}) + "\\n")
    if rate:
        out.flush()
""" % PAYLOAD


def through_service(bench, session_id: str, container_id: str, count: int,
                    rate: float) -> tuple[float, list[float], int]:
    """(events/s at the WebSocket client, latencies in ms, times the client was dropped as too slow and resumed)
    for `count` lines printed at `rate` (0: at once)."""
    since = bench.events.last_id(session_id)
    ws = bench.socket(session_id, since)
    turn = ClaimedTurn(id=str(uuid.uuid4()), seq=1, attempt=1)
    publisher = Publisher(bench.events, ClaimedSession(id=session_id), turn)
    output, result = TurnOutput(), []

    def pump() -> None:
        lines = bench.runtime.exec_lines(container_id, ["python3", "-c", EMITTER, str(count), str(rate)], {}, b"",
                                         result)
        for record, size in lines:
            line = output.take(record, size)
            if line is not None:
                publisher.add(f"claude.{line['type']}", line, output.number)
        publisher.flush()
        publisher.close()

    start = time.time()
    threading.Thread(target=pump, daemon=True).start()
    latencies, resumed = [], 0
    while len(latencies) < count:
        try:
            frame = next_frame(ws)
        except SlowClient:  # what a client should do: resume from the last id it got
            resumed += 1
            ws = bench.socket(session_id, since)
            continue
        arrived = time.time()
        since = frame["id"]
        if frame.get("turn_id") == turn["id"]:
            latencies.append((arrived - frame["data"]["sent"]) * 1000)
    ws.close()
    return count / (time.time() - start), latencies, resumed


def raw_redis(bench, count: int, rate: float) -> tuple[float, list[float]]:
    """The same payloads through redis-py alone: XADD in one thread, an XREAD BLOCK loop in another."""
    key = f"{bench.settings.key_prefix}:bench:raw:{uuid.uuid4().hex}"
    producer = redis.Redis.from_url(bench.settings.redis_url)
    pad = "x" * PAYLOAD

    def produce() -> None:
        begin = time.time()
        for i in range(1, count + 1):
            if rate:
                time.sleep(max(0.0, begin + i / rate - time.time()))
            producer.xadd(key, {"e": json.dumps({"type": "stream_event", "sent": time.time(), "pad": pad})})

    start, cursor, latencies = time.time(), "0-0", []
    threading.Thread(target=produce, daemon=True).start()
    while len(latencies) < count:
        for _key, entries in bench.redis.xread({key: cursor}, count=500, block=1000) or []:
            arrived = time.time()
            for entry_id, fields in entries:
                cursor = entry_id
                latencies.append((arrived - json.loads(fields["e"])["sent"]) * 1000)
    bench.redis.delete(key)
    return count / (time.time() - start), latencies


def measure(bench, runs: int, flood: int = 20_000, paced_seconds: float = 10.0) -> list[Figure]:
    session = bench.new_session()
    container = bench.container_of(session["id"]).id
    ours_rate, base_rate, ours_paced, base_paced = [], [], [], []
    through_service(bench, session["id"], container, 500, 0)  # warm up
    drops = 0
    for _ in range(runs):
        rate, _latencies, dropped = through_service(bench, session["id"], container, flood, 0)
        ours_rate.append(rate)
        drops += dropped
        base_rate.append(raw_redis(bench, flood, 0)[0])
    paced = int(100 * paced_seconds)
    for _ in range(max(1, runs // 2)):
        ours_paced += through_service(bench, session["id"], container, paced, 100)[1]
        base_paced += raw_redis(bench, paced, 100)[1]
    o, b = summary(ours_rate), summary(base_rate)
    o["p99"], b["p99"] = o["min"], b["min"]  # for a rate, the tail that matters is the slowest run
    lat = summary(ours_paced)
    return [Figure(id="M3-rate", what="event pipeline: 1 KB lines as fast as printed, events/s at a WebSocket",
                   unit="events/s", ours=o, baseline=b, baseline_name="XADD -> XREAD BLOCK",
                   target=">= 0.5x baseline", met=o["median"] >= 0.5 * b["median"],
                   derived={"slow-client drops (resumed)": drops},
                   notes="for a rate the p99 column holds the slowest run (higher is better)"),
            Figure(id="M3-latency", what="event pipeline: 1 KB lines at 100/s, print -> WebSocket", unit="ms",
                   ours=lat, baseline=summary(base_paced), baseline_name="XADD -> XREAD BLOCK",
                   target="p99 <= 5 ms", met=lat["p99"] <= 5)]
