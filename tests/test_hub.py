"""The web's event hub: one Redis reader per process fans every followed stream out to its sockets, in order,
exactly once; a slow client is dropped with a reason and resumes; SSE and NDJSON followers still work."""
from __future__ import annotations

import json
import os
import random
import re
import secrets
import socket
import struct
import threading
import time

import pytest
import redis
import requests
import websocket

from core.envelope import Event
from core.events import EventLog
from tests import stack
from tests.conftest import wait_for
from web.hub import SlowClient, follow

pytestmark = pytest.mark.docker
FINAL = {"turn.completed", "turn.failed", "turn.cancelled"}


class Api:
    """Just enough of the HTTP API for these tests."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token = base, token
        self.headers = {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, expect: int, **kwargs) -> dict:
        resp = requests.request(method, self.base + path, headers=self.headers, timeout=30, **kwargs)
        assert resp.status_code == expect, (method, path, resp.status_code, resp.text)
        return resp.json()

    def session(self) -> str:
        return self.call("POST", "/api/v1/sessions", 201, json={"workspace": {"type": "ephemeral"}})["id"]

    def ws_url(self, sid: str, since: str | None = None) -> str:
        url = self.base.replace("http", "ws", 1) + f"/api/v1/sessions/{sid}/stream?token={self.token}"
        return url + (f"&since={since}" if since else "")


class Follower(threading.Thread):
    """A WebSocket client that records every event frame (and when it came) until it has seen `until`."""

    def __init__(self, url: str, until: str | None = None, until_type: str | None = None) -> None:
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(url, timeout=60)
        self.until, self.until_type = until, until_type
        self.frames: list[dict] = []
        self.arrived: list[float] = []
        self.error: Exception | None = None
        self.done = threading.Event()

    def finished(self) -> bool:
        if not self.frames:
            return False
        last = self.frames[-1]
        return last["id"] == self.until or (self.until_type is not None and last["type"] == self.until_type)

    def run(self) -> None:
        self.ws.settimeout(0.5)  # `until` may be set after the last frame came: look again each half second
        try:
            while not self.finished():
                try:
                    frame = json.loads(self.ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if frame.get("type") != "reply":
                    self.frames.append(frame)
                    self.arrived.append(time.time())
        except Exception as exc:  # surfaced by ids()
            self.error = exc
        finally:
            self.ws.close()
            self.done.set()

    def ids(self, timeout: float = 60) -> list[str]:
        assert self.done.wait(timeout), f"follower stopped short: {len(self.frames)} frames, last {self.frames[-1:]}"
        assert self.error is None, self.error
        return [f["id"] for f in self.frames]


def stored_ids(client: redis.Redis, prefix: str, sid: str, after: str | None = None) -> list[str]:
    return [i for i, _ in client.xrange(f"{prefix}:events:{sid}", min=f"({after}" if after else "-")]


def through(ids: list[str], last: str) -> list[str]:
    """`ids` up to and including `last` (a status event may come after it)."""
    return ids[:ids.index(last) + 1]


def publish(log: EventLog, sid: str, count: int, pad: int = 0, pause: float = 0.0) -> list[str]:
    """Publishes `count` events straight into the session's stream (as a worker does) and returns their ids."""
    ids = []
    for n in range(count):
        event = Event(session_id=sid, type="claude.stream_event", data={"n": n, "t": time.time(), "pad": "x" * pad})
        ids.append(log.publish(event))
        if pause:
            time.sleep(pause)
    return ids


def web_redis_connections(web: stack.Process, client: redis.Redis) -> list[dict]:
    """CLIENT LIST entries of the web process's own Redis connections (matched by their local ports)."""
    inodes = set()
    pids = [web.proc.pid] + [int(p) for p in os.popen(f"pgrep -P {web.proc.pid}").read().split()]
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            cols = line.split()
            if cols[9] in inodes:
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return [c for c in client.client_list() if int(c["addr"].rsplit(":", 1)[1]) in ports]


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("hub-owner"))


@pytest.fixture(scope="module")
def log(stack_env):
    s = stack_env["settings"]
    return EventLog(redis.Redis.from_url(s.redis_url, decode_responses=True), s.key_prefix, s.events_maxlen)


def test_many_websocket_followers_get_every_event_once_in_order_through_one_redis_reader(stack_env, api, log):
    sid = api.session()
    followers = [Follower(api.ws_url(sid)) for _ in range(40)]
    for f in followers:
        f.start()
    time.sleep(1.0)  # every follower has replayed and subscribed
    ours = web_redis_connections(stack_env["web"], log.redis)
    blocked = [c for c in ours if c["cmd"] == "xread" and "b" in c["flags"]]
    hubs = [c for c in ours if c["name"].startswith(f"{stack_env['settings'].key_prefix}-hub-")]
    # The web holds one reading connection for 40 followers (today's code held 40).
    assert len(hubs) == 1 and len(blocked) == 1 and blocked[0]["id"] == hubs[0]["id"], ours

    ids = publish(log, sid, 300, pause=0.002)
    for f in followers:
        f.until = ids[-1]
    expected = through(stored_ids(log.redis, log.prefix, sid), ids[-1])
    for f in followers:
        got = f.ids()
        assert got == expected, (len(got), len(expected), len(got) - len(set(got)))
    assert all(f.frames[-1]["data"]["n"] == 299 for f in followers)


def test_a_follower_joining_mid_stream_with_since_gets_the_backlog_then_live_events(stack_env, api, log):
    sid = api.session()
    early = Follower(api.ws_url(sid))
    early.start()
    first = publish(log, sid, 100)
    joined = []

    def join_later() -> None:
        time.sleep(0.3)  # while the second batch is being published
        joined.append(Follower(api.ws_url(sid, since=first[40])))
        joined[0].start()

    joiner = threading.Thread(target=join_later)
    joiner.start()
    second = publish(log, sid, 200, pause=0.005)
    joiner.join()
    for f in (early, joined[0]):
        f.until = second[-1]
    assert early.ids() == through(stored_ids(log.redis, log.prefix, sid), second[-1])
    # The backlog, then live: no gap, no repeat (the session's own status events may be among them).
    got = joined[0].ids()
    assert got == through(stored_ids(log.redis, log.prefix, sid, after=first[40]), second[-1])
    assert set(first[41:] + second) <= set(got)


def test_a_real_chat_turn_reaches_every_follower_once_in_order(stack_env, api, log):
    sid = api.session()
    followers = [Follower(api.ws_url(sid), until_type="turn.completed") for _ in range(5)]
    for f in followers:
        f.start()
    turn = api.call("POST", f"/api/v1/sessions/{sid}/chat", 202, json={"prompt": "SAY: hello from the hub"})
    for f in followers:
        ids = f.ids(120)
        assert ids == stored_ids(log.redis, log.prefix, sid)[:len(ids)]
        kinds = [fr["type"] for fr in f.frames if fr["turn_id"] == turn["id"]]
        assert kinds[0] == "turn.queued" and kinds[-1] == "turn.completed" and "turn.started" in kinds
        assert f.frames[-1]["data"]["result"] == "hello from the hub"


def metric(base: str, name: str, **labels: str) -> float:
    text = requests.get(base + "/metrics", timeout=10).text
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    match = re.search(rf"^{name}\{{{wanted}\}} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def read_until_close(ws: websocket.WebSocket) -> tuple[list[dict], int, str]:
    """Every event frame a (so far silent) client finds waiting, then the close frame's code and reason."""
    frames = []
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return frames, struct.unpack("!H", data[:2])[0], data[2:].decode()
        if opcode == websocket.ABNF.OPCODE_TEXT:
            frames.append(json.loads(data))


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_slow_client_is_dropped_with_a_reason_never_slows_others_and_resumes(stack_env, api, log, worker_class):
    port = stack.free_port()
    # A small buffer makes the drop quick; long pings keep the silent client's socket from timing out first.
    env = {**stack_env["env"], "CCD_PORT": str(port), "CCD_STREAM_BUFFER_EVENTS": "50", "CCD_WS_PING_SECONDS": "120",
           "WEB_WORKER_CLASS": worker_class}
    web = stack.start_web(env, port, name=f"web-hub-slow-{worker_class}")
    try:
        local = Api(f"http://127.0.0.1:{port}", api.token)
        sid = local.session()
        slow = websocket.create_connection(local.ws_url(sid), timeout=60,
                                           sockopt=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)])
        fast = Follower(local.ws_url(sid))
        fast.start()
        time.sleep(1.0)
        started = time.time()
        ids = publish(log, sid, 400, pad=20_000, pause=0.001)  # 8 MB: more than the kernel buffers hold
        fast.until = ids[-1]
        got = fast.ids()
        expected = through(stored_ids(log.redis, log.prefix, sid), ids[-1])  # ours, and the session's status events
        assert got == expected and set(ids) <= set(got)
        lags = sorted(a - f["data"]["t"] for f, a in zip(fast.frames, fast.arrived, strict=True) if f["id"] in set(ids))
        assert time.time() - started < 20 and lags[int(len(lags) * 0.99)] < 2.0, lags[-5:]
        wait_for(lambda: metric(local.base, "ccd_stream_dropped_total", transport="ws") >= 1, 30,
                 what="the slow client to be dropped")

        frames, code, reason = read_until_close(slow)  # the client reads again: what it was sent, then why it ended
        last = frames[-1]["id"]
        assert code == 4008 and reason == f"slow client: more than 50 events behind; resume with since={last}"
        assert [f["id"] for f in frames] == expected[:len(frames)] and len(frames) < len(expected)
        slow.close()

        resumed = Follower(local.ws_url(sid, since=last), until=ids[-1])
        resumed.start()
        assert [f["id"] for f in frames] + resumed.ids() == expected  # the rest, exactly once
    finally:
        web.stop()


def test_sse_and_ndjson_followers_still_work(stack_env, api, log):
    sid = api.session()
    headers = {**api.headers, "Accept": "text/event-stream"}
    with requests.get(f"{api.base}/api/v1/sessions/{sid}/events", headers=headers, stream=True, timeout=60) as resp:
        assert resp.status_code == 200
        ids = publish(log, sid, 50)
        seen = []
        for line in resp.iter_lines(decode_unicode=True):
            if line.startswith("id: "):
                seen.append(line[4:])
                if seen[-1] == ids[-1]:
                    break
    assert seen == through(stored_ids(log.redis, log.prefix, sid), ids[-1])

    with requests.post(f"{api.base}/api/v1/sessions/{sid}/chat", headers=api.headers, stream=True, timeout=120,
                       json={"prompt": "SAY: streamed by the hub", "stream": True}) as resp:
        assert resp.status_code == 200
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    assert lines[0]["type"] == "turn.queued" and lines[-1]["type"] == "turn.completed"
    assert lines[-1]["data"]["result"] == "streamed by the hub"
    turn_ids = [i for i, f in log.redis.xrange(log.key(sid)) if json.loads(f["e"])["turn_id"] == lines[0]["turn_id"]]
    assert [line["id"] for line in lines] == turn_ids


def test_feeds_joining_at_random_points_while_events_flow_each_get_their_exact_tail(settings):
    """The hub alone (real Redis): followers join at random cursors mid-stream, some with small buffers."""
    log = EventLog(redis.Redis.from_url(settings.redis_url, decode_responses=True),
                   f"{settings.key_prefix}hub{secrets.token_hex(2)}", 100_000)
    sid, rng = "hub-unit", random.Random(7)
    ids: list[str] = publish(log, sid, 50)
    results: dict[int, tuple[str, list[str] | str]] = {}
    done = threading.Event()

    def run(n: int) -> None:
        time.sleep(rng.random() * 1.5)
        since = rng.choice(ids) if n % 3 else "0-0"
        feed, got = follow(log, sid, since, limit=100_000 if n % 4 else 30), []
        try:
            while not (done.is_set() and got and got[-1] == ids[-1]):
                got += [e.id for e in feed.next(0.2)]
                if n % 5 == 0:
                    time.sleep(0.001)  # a slower reader
            results[n] = (since, got)
        except SlowClient as exc:
            results[n] = (since, exc.last_id)
        finally:
            feed.close()

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(24)]
    for t in threads:
        t.start()
    for _ in range(40):
        ids += publish(log, sid, rng.randint(1, 60))
        time.sleep(0.05)
    done.set()
    for t in threads:
        t.join(60)
    assert len(results) == 24
    for n, (since, got) in results.items():
        after = stored_ids(log.redis, log.prefix, sid, None if since == "0-0" else since)
        if isinstance(got, str):  # dropped: it resumes after what it was given
            assert n % 4 == 0 and got in [since] + after
        else:
            assert got == after, (n, len(got), len(after))
    log.redis.delete(log.key(sid))
