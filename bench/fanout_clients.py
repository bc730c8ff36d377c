"""A load generator for M5: many WebSocket followers in one asyncio process, each on one of the given sessions.

    python -m bench.fanout_clients <ws base url> <token> <count> <session id>...

Prints "connected <n>" once every socket is open, then records each bench event's delivery latency (receipt
minus the `sent` time the publisher put in it); on a line "stop" from stdin it prints one JSON line with
the latencies and per-client counts, and exits.
"""
from __future__ import annotations

import asyncio
import json
import sys
import time

import websockets


async def follow(url: str, latencies: list[float], counts: list[int], index: int, opened: asyncio.Event) -> None:
    async with websockets.connect(url, max_size=None, ping_interval=None, open_timeout=120) as ws:
        opened.set()
        async for raw in ws:
            arrived = time.time()
            sent = (json.loads(raw).get("data") or {}).get("bench_sent")
            if sent is not None:
                latencies.append((arrived - sent) * 1000)
                counts[index] += 1


async def main(base: str, token: str, count: int, sessions: list[str]) -> None:
    latencies: list[float] = []
    counts, tasks, gate = [0] * count, [], asyncio.Semaphore(50)  # open 50 at a time, as clients trickle in
    since = f"{int(time.time() * 1000)}-0"  # only what is published from now on

    async def start(i: int) -> None:
        async with gate:
            opened = asyncio.Event()
            url = f"{base}/sessions/{sessions[i % len(sessions)]}/stream?token={token}&since={since}"
            task = asyncio.ensure_future(follow(url, latencies, counts, i, opened))
            tasks.append(task)
            await asyncio.wait([task, asyncio.ensure_future(opened.wait())], return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                raise RuntimeError(f"client {i} could not connect: {task.exception()!r}")

    await asyncio.gather(*(start(i) for i in range(count)))
    print(f"connected {count}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    lost = sum(1 for t in tasks if t.done())
    print(json.dumps({"latencies": latencies, "counts": counts, "closed_early": lost}), flush=True)
    for task in tasks:
        task.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]))
