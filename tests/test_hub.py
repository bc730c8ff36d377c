"""The web's event hub: one Redis reader per process fans every followed stream out to its sockets, in order,
exactly once; a slow client is dropped with a reason and resumes; SSE and NDJSON followers still work."""
from __future__ import annotations

import contextlib
import json
import os
import random
import re
import secrets
import socket
import struct
import threading
import time
from typing import Iterator

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


def stored_turn_ids(log: EventLog, sid: str, turn_id: str) -> list[str]:
    return [i for i, f in log.redis.xrange(log.key(sid)) if json.loads(f["e"])["turn_id"] == turn_id]


def through(ids: list[str], last: str) -> list[str]:
    """`ids` up to and including `last` (a status event may come after it)."""
    return ids[:ids.index(last) + 1]


def publish(log: EventLog, sid: str, count: int, pad: int = 0, pause: float = 0.0,
            turn_id: str | None = None) -> list[str]:
    """Publishes `count` events straight into the session's stream (as a worker does) and returns their ids."""
    ids = []
    for n in range(count):
        event = Event(session_id=sid, type="claude.stream_event", data={"n": n, "t": time.time(), "pad": "x" * pad},
                      turn_id=turn_id)
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


@contextlib.contextmanager
def small_buffer_web(stack_env, api: Api, worker_class: str, name: str, **extra: str) -> Iterator[Api]:
    """A web tier of its own whose followers buffer only 50 events, and an Api on it."""
    port = stack.free_port()
    # A small buffer makes the drop quick; long pings keep the silent client's socket from timing out first.
    env = {**stack_env["env"], "CCD_PORT": str(port), "CCD_STREAM_BUFFER_EVENTS": "50", "CCD_WS_PING_SECONDS": "120",
           "WEB_WORKER_CLASS": worker_class, **extra}
    web = stack.start_web(env, port, name=f"{name}-{worker_class}")
    try:
        yield Api(f"http://127.0.0.1:{port}", api.token)
    finally:
        web.stop()


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_slow_client_is_dropped_with_a_reason_never_slows_others_and_resumes(stack_env, api, log, worker_class):
    with small_buffer_web(stack_env, api, worker_class, "web-hub-slow") as local:
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
    assert [line["id"] for line in lines] == stored_turn_ids(log, sid, lines[0]["turn_id"])


class LineFollower(threading.Thread):
    """An HTTP client of a streamed body (SSE or NDJSON) that records its event frames until the one whose
    data has n == `last_n` (a published event's number: NDJSON sends no heartbeats to look again on)."""

    def __init__(self, resp: requests.Response, frame_of, last_n: int) -> None:
        super().__init__(daemon=True)
        assert resp.status_code == 200, resp.text
        self.resp, self.frame_of, self.last_n = resp, frame_of, last_n
        self.frames: list[dict] = []
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for line in self.resp.iter_lines(decode_unicode=True):
                frame = self.frame_of(line)
                if frame is not None:
                    self.frames.append(frame)
                    if frame["data"].get("n") == self.last_n:
                        return
        finally:
            self.resp.close()
            self.done.set()

    def ids(self, timeout: float = 60) -> list[str]:
        assert self.done.wait(timeout), f"follower stopped short: {len(self.frames)} frames"
        return [f["id"] for f in self.frames]


def sse_frame_of(line: str) -> dict | None:
    return json.loads(line[len("data: "):]) if line.startswith("data: ") else None


def ndjson_frame_of(line: str) -> dict | None:
    return json.loads(line) if line else None


def silent_request(base: str, method: str, path: str, headers: dict, body: dict | None = None) -> socket.socket:
    """Sends a request from a socket with a small receive buffer, and reads nothing yet: a client far slower
    than the events. HTTP/1.0, so the body comes as it is (not chunked) and ends when the server closes."""
    host, port = base.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the window offered
    sock.connect((host, int(port)))
    payload = b"" if body is None else json.dumps(body).encode()
    head = [f"{method} {path} HTTP/1.0", f"Host: {host}:{port}", "Content-Type: application/json",
            f"Content-Length: {len(payload)}"] + [f"{k}: {v}" for k, v in headers.items()]
    sock.sendall("\r\n".join(head).encode() + b"\r\n\r\n" + payload)
    return sock


def read_to_end(sock: socket.socket) -> list[str]:
    """The body's non-empty lines, once the silent client reads again: all it was sent, up to the server's close."""
    sock.settimeout(60)
    chunks = []
    while chunk := sock.recv(1 << 16):
        chunks.append(chunk)
    sock.close()
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"200", head
    return [line for line in body.decode().splitlines() if line]


def events_after(api: Api, sid: str, since: str) -> list[dict]:
    """Every stored event after `since`, a page at a time (how a dropped NDJSON client gets the rest)."""
    items = []
    while True:
        page = api.call("GET", f"/api/v1/sessions/{sid}/events?since={since}&limit=1000", 200)
        items += page["items"]
        if not page["has_more"]:
            return items
        since = page["next_since"]


SLOW_REASON = "slow client: more than 50 events behind; resume with since={}"


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_slow_sse_follower_ends_with_a_comment_naming_where_to_resume(stack_env, api, log, worker_class):
    with small_buffer_web(stack_env, api, worker_class, "web-hub-slow-sse") as local:
        sid = local.session()
        path, headers = f"/api/v1/sessions/{sid}/events", {**local.headers, "Accept": "text/event-stream"}
        slow = silent_request(local.base, "GET", path, headers)
        fast = LineFollower(requests.get(local.base + path, headers=headers, stream=True, timeout=60),
                            sse_frame_of, 399)
        fast.start()
        time.sleep(1.0)
        ids = publish(log, sid, 400, pad=20_000, pause=0.001)  # 8 MB: more than the kernel buffers hold
        expected = through(stored_ids(log.redis, log.prefix, sid), ids[-1])
        assert fast.ids() == expected

        lines = read_to_end(slow)
        frames = [f for f in map(sse_frame_of, lines) if f]
        last = frames[-1]["id"]
        assert lines[-1] == ": " + SLOW_REASON.format(last)  # EventSource ignores it, and resumes from `last` too
        # Counted once the writer gets past its blocked write: only then does it learn it was dropped.
        assert metric(local.base, "ccd_stream_dropped_total", transport="sse") == 1
        assert [f["id"] for f in frames] == expected[:len(frames)] and len(frames) < len(expected)

        resumed = LineFollower(requests.get(f"{local.base}{path}?since={last}", headers=headers, stream=True,
                                            timeout=60), sse_frame_of, 399)
        resumed.start()
        assert [f["id"] for f in frames] + resumed.ids() == expected  # the rest, exactly once


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_a_slow_ndjson_chat_stream_ends_with_a_line_naming_where_to_resume(stack_env, api, log, worker_class):
    with small_buffer_web(stack_env, api, worker_class, "web-hub-slow-ndjson") as local:
        sid = local.session()
        # Both ask for the same turn (one Idempotency-Key); it runs slowly, so neither stream ends meanwhile.
        path, body = f"/api/v1/sessions/{sid}/chat", {"prompt": "SLOW: 60", "stream": True}
        headers = {**local.headers, "Idempotency-Key": secrets.token_hex(8)}
        slow = silent_request(local.base, "POST", path, headers, body)
        resp = requests.post(local.base + path, headers=headers, json=body, stream=True, timeout=60)
        turn = resp.headers["X-Turn-Id"]
        fast = LineFollower(resp, ndjson_frame_of, 399)
        fast.start()
        time.sleep(1.0)
        try:
            ids = publish(log, sid, 400, pad=20_000, pause=0.001, turn_id=turn)
            expected = through(stored_turn_ids(log, sid, turn), ids[-1])
            assert fast.ids() == expected

            lines = [json.loads(line) for line in read_to_end(slow)]
            got = [line["id"] for line in lines[:-1]]
            assert lines[-1] == {"error": {"code": "slow_client", "message": SLOW_REASON.format(got[-1]),
                                           "resume_since": got[-1]}}
            assert got == expected[:len(got)] and len(got) < len(expected)
            assert metric(local.base, "ccd_stream_dropped_total", transport="ndjson") == 1
            rest = [e["id"] for e in events_after(local, sid, got[-1]) if e["turn_id"] == turn]
            assert got + through(rest, ids[-1]) == expected  # the rest, exactly once
        finally:
            requests.post(f"{local.base}/api/v1/turns/{turn}/cancel", headers=local.headers, timeout=30)


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


@pytest.mark.parametrize("worker_class", ["gevent", "gthread"])
def test_an_sse_follower_that_takes_nothing_is_disconnected_after_the_send_timeout(stack_env, api, log, worker_class):
    """gunicorn writes SSE bodies itself, with no time limit: without the stall watch, this client would keep its
    connection (and a gthread thread) until it read again."""
    with small_buffer_web(stack_env, api, worker_class, "web-hub-stalled-sse",
                          CCD_STREAM_SEND_TIMEOUT_SECONDS="2") as local:
        sid = local.session()
        path, headers = f"/api/v1/sessions/{sid}/events", {**local.headers, "Accept": "text/event-stream"}
        stalled = silent_request(local.base, "GET", path, headers)
        time.sleep(1.0)
        publish(log, sid, 400, pad=20_000, pause=0.001)  # 8 MB: the server's writes block on the silent client
        wait_for(lambda: metric(local.base, "ccd_stream_dropped_total", transport="sse") == 1, 30,
                 what="the stalled SSE client to be cut off while it reads nothing")
        lines = read_to_end(stalled)  # what it was sent, then the end: no reading again was needed
        frames = [f for f in map(sse_frame_of, lines[:-1]) if f]  # the last line may be cut mid-write
        assert frames and [f["id"] for f in frames] == stored_ids(log.redis, log.prefix, sid)[:len(frames)]
