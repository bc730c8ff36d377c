"""Faults of the services around the workers, injected for real: the web process killed, Redis
restarted, Postgres restarted. Each test runs its own small stack (web, worker, and the server it
breaks) beside the run's, sharing its session image, network and scripted model server.

Each test prints a FAULTS line with its figures (faults injected, events counted, lost, duplicated).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis
import requests
import websocket
import yaml
from sqlalchemy import create_engine, func, select
from sqlalchemy.engine import make_url

from core.migrate import prepare_database
from core.models import Turn
from core.settings import Settings
from core.turn_states import final_event_type
from tests import stack
from tests.figures import report
from tests.conftest import wait_for
from web.follow import CHECK_EVERY_SECONDS

pytestmark = pytest.mark.docker
FINAL = {"turn.completed", "turn.failed", "turn.cancelled"}
OPEN_TURN = ("queued", "running")


class Api:
    """A caller of one stack's HTTP API."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.token, self.headers = base, token, {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, expect: int | None = 200, **kwargs) -> requests.Response:
        resp = requests.request(method, self.base + path, headers={**self.headers, **kwargs.pop("headers", {})},
                                timeout=kwargs.pop("timeout", 30), **kwargs)
        if expect is not None:
            assert resp.status_code == expect, (method, path, resp.status_code, resp.text)
        return resp

    def session(self) -> str:
        return self.call("POST", "/api/v1/sessions", 201, json={"workspace": {"type": "ephemeral"}}).json()["id"]

    def chat(self, sid: str, prompt: str) -> dict:
        return self.call("POST", f"/api/v1/sessions/{sid}/chat", 202, json={"prompt": prompt}).json()

    def turn(self, turn_id: str) -> dict:
        return self.call("GET", f"/api/v1/turns/{turn_id}").json()

    def finished(self, turn_id: str, timeout: float = 120) -> dict:
        def done():
            turn = self.turn(turn_id)
            return turn if turn["status"] not in OPEN_TURN else None
        return wait_for(done, timeout, what=f"turn {turn_id} to finish")


class Follower(threading.Thread):
    """A streaming client (WebSocket or SSE) that, whenever its connection drops, reconnects with
    the id of the last event it received, until it has the final event of each turn in `turns`."""

    def __init__(self, kind: str, api: Api, sid: str, turns: set[str] | None = None) -> None:
        super().__init__(daemon=True, name=f"follow-{kind}")
        self.kind, self.api, self.sid, self.turns = kind, api, sid, set(turns or ())
        self.frames: list[dict] = []
        self.connection_of: list[int] = []  # the connection (1, 2, ...) each frame came on
        self.connections, self.drops = 0, []
        self.stop_at = time.monotonic() + 300
        self.halt = threading.Event()

    def done(self) -> bool:
        ended = {f["turn_id"] for f in self.frames if f["type"] in FINAL}
        return bool(self.turns) and self.turns <= ended

    def last_id(self) -> str | None:
        return self.frames[-1]["id"] if self.frames else None

    def run(self) -> None:
        while not self.done() and not self.halt.is_set() and time.monotonic() < self.stop_at:
            try:
                self.websocket() if self.kind == "ws" else self.sse()
            except Exception as exc:  # the web went away: reconnect, as a real client does
                self.drops.append(repr(exc)[:200])
                time.sleep(0.2)

    def take(self, frame: dict) -> None:
        self.frames.append(frame)
        self.connection_of.append(self.connections)

    def websocket(self) -> None:
        since = self.last_id()
        url = (self.api.base.replace("http", "ws", 1) + f"/api/v1/sessions/{self.sid}/stream?token={self.api.token}"
               + (f"&since={since}" if since else ""))
        ws = websocket.create_connection(url, timeout=30)
        self.connections += 1
        try:
            while not self.done() and not self.halt.is_set():
                raw = ws.recv()
                if not raw:
                    raise ConnectionError("the WebSocket closed")
                frame = json.loads(raw)
                if frame.get("type") != "reply":
                    self.take(frame)
        finally:
            ws.close()

    def sse(self) -> None:
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": self.last_id()} if self.last_id() else {})}
        with requests.get(f"{self.api.base}/api/v1/sessions/{self.sid}/events", stream=True, timeout=(5, 30),
                          headers={**self.api.headers, **headers}) as resp:
            assert resp.status_code == 200, resp.text
            self.connections += 1
            for line in resp.iter_lines(chunk_size=None, decode_unicode=True):
                if line.startswith("data: "):
                    self.take(json.loads(line[len("data: "):]))
                    if self.done() or self.halt.is_set():
                        return
        raise ConnectionError("the SSE response ended")

    def result(self, timeout: float = 120) -> list[dict]:
        self.join(timeout)
        assert not self.is_alive() and self.done(), f"{self.kind} client never got every final event: {self.drops}"
        return self.frames


def stream_ids(client: redis.Redis, prefix: str, sid: str) -> list[str]:
    return [entry_id for entry_id, _ in client.xrange(f"{prefix}:events:{sid}")]


def check_delivery(follower: Follower, stored: list[str]) -> dict:
    """Every stored event up to the client's last one arrived exactly once, in order; returns the figures."""
    ids = [f["id"] for f in follower.frames]
    expected = [i for i in stored if stack_id(i) <= stack_id(ids[-1])]
    duplicates = len(ids) - len(set(ids))
    lost = len(set(expected) - set(ids))
    assert duplicates == 0, f"{follower.kind}: {duplicates} events delivered twice"
    assert lost == 0, f"{follower.kind}: {lost} stored events never delivered"
    assert ids == expected, f"{follower.kind}: events out of order or foreign"
    return {"client": follower.kind, "delivered": len(ids), "connections": follower.connections,
            "lost": lost, "duplicates": duplicates}


def stack_id(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


def private_env(stack_env, **overrides: str) -> dict[str, str]:
    """The run's stack environment (image, network, model server, keys) with some values replaced."""
    return {**stack_env["env"], **overrides}


def remove_containers(docker_client, prefix: str) -> None:
    """Removes the containers and volumes a test's own stack made (the run's clean-up knows only its prefix)."""
    for container in docker_client.containers.list(all=True, filters={"label": f"ccd.prefix={prefix}"}):
        container.remove(force=True)
    for volume in docker_client.volumes.list(filters={"label": f"ccd.prefix={prefix}"}):
        volume.remove(force=True)


# ---------------------------------------------------------------------------------------------
# 3. The web process killed (SIGKILL) and restarted while clients stream.


def test_web_killed_mid_stream_clients_resume_with_last_id_and_miss_nothing(stack_env, token, settings):
    port = stack.free_port()
    env = private_env(stack_env, CCD_PORT=str(port))
    web = stack.start_web(env, port, name="web-fault3")
    api = Api(f"http://127.0.0.1:{port}", token("fault3-owner"))
    try:
        sid = api.session()
        api.finished(api.chat(sid, "SAY: warm up")["id"])
        turn = api.chat(sid, "SLOW: 20")  # about 80 streamed text deltas over 20 s
        followers = [Follower(kind, api, sid, {turn["id"]}) for kind in ("ws", "sse")]
        for f in followers:
            f.start()

        def deltas_seen() -> int:
            return min(sum(fr["type"] == "claude.stream_event" and fr["turn_id"] == turn["id"] for fr in f.frames)
                       for f in followers)

        kills = 0
        for threshold in (8, 24):  # twice, each time while the turn is streaming
            wait_for(lambda t=threshold: deltas_seen() >= t, 60, 0.05, what=f"{threshold} streamed deltas")
            assert api.turn(turn["id"])["status"] == "running", "the fault must land mid-turn"
            web.kill()  # SIGKILL to gunicorn and its workers
            kills += 1
            time.sleep(1.0)  # the turn keeps streaming into Redis while no web answers
            web = stack.start_web(env, port, name="web-fault3")
        frames = [f.result() for f in followers]
        final = api.finished(turn["id"])
        assert final["status"] == "succeeded" and final["result"].endswith("SLOW-DONE"), final

        stored = stream_ids(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.key_prefix, sid)
        figures = [check_delivery(f, stored) for f in followers]
        for f, got in zip(followers, frames, strict=True):
            assert got[-1]["type"] == "turn.completed" and got[-1]["turn_id"] == turn["id"]
            # The turn's events really arrived over three connections: both kills cut a live stream.
            carried = {c for fr, c in zip(got, f.connection_of, strict=True) if fr["turn_id"] == turn["id"]}
            assert len(carried) >= 3 and f.connections >= 3, (f.kind, carried, f.drops)
        report("web_killed", {"faults_injected": kills, "events_stored": len(stored), "clients": figures})
    finally:
        web.stop()


# ---------------------------------------------------------------------------------------------
# 4. Redis restarted, with the AOF settings compose.yaml ships.


def compose_redis_args() -> list[str]:
    """The redis service's command line from compose.yaml (after the program name)."""
    compose = yaml.safe_load((stack.ROOT / "compose.yaml").read_text())
    command = compose["services"]["redis"]["command"]
    # ${VAR:-default}, as compose fills it in with nothing set in .env
    return [re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", arg) for arg in command[1:]]


def test_compose_redis_keeps_an_aof_fsynced_every_second():
    args = compose_redis_args()
    options = dict(zip(args[::2], args[1::2], strict=True))
    assert options.get("--appendonly") == "yes" and options.get("--appendfsync") == "everysec", args


class RedisServer:
    """A private redis-server on a free port, its data (AOF) in a temp dir, started with compose.yaml's options."""

    def __init__(self) -> None:
        self.port, self.dir = stack.free_port(), tempfile.mkdtemp(prefix="ccd-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        assert exe, "redis-server is not installed"
        # No RDB snapshots: what comes back after a restart comes from the AOF alone.
        argv = [exe, *compose_redis_args(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", self.dir, "--save", "", "--daemonize", "no"]
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
        client = redis.Redis.from_url(self.url)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:  # refused, or still LOADING the AOF
                return False
        wait_for(answers, 30, what="the private redis-server to answer")
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)


def queued_messages(client: redis.Redis, prefix: str) -> dict[str, list[bytes]]:
    """Every Celery message waiting in a queue list of this prefix, by list."""
    found = {}
    for key in client.scan_iter(match=f"{prefix}:celery:*", count=1000):
        if client.type(key) == b"list":
            found[key.decode()] = client.lrange(key, 0, -1)
    return found


@pytest.fixture
def private_database(settings):
    """A database of its own on the run's Postgres, so the run's reaper never touches this test's turns."""
    url = make_url(settings.database_url)
    database_url = url.set(database=f"{url.database}_f{secrets.token_hex(3)}").render_as_string(hide_password=False)
    prepare_database(database_url)
    yield database_url
    stack.drop_database(database_url)


def test_redis_restart_keeps_every_event_and_queued_turn_and_everyone_reconnects(stack_env, token, settings,
                                                                              private_database, docker_client):
    server = RedisServer().start()
    port = stack.free_port()
    prefix = f"{settings.key_prefix}rd"  # containers of its own: the run's reaper would remove them as unknown
    env = private_env(stack_env, CCD_PORT=str(port), REDIS_URL=server.url, DATABASE_URL=private_database,
                      CCD_MODEL_PROXY_PORT=str(stack.free_port()), CCD_KEY_PREFIX=prefix)
    web = worker = proxy = None
    followers: list[Follower] = []
    try:
        proxy = stack.start_proxy(env, name="model-proxy-fault4")  # it checks sessions in this test's database
        web = stack.start_web(env, port, name="web-fault4")
        worker = stack.start_worker(env, name="worker-fault4")
        api = Api(f"http://127.0.0.1:{port}", token("fault4-owner"))
        a, b, spare = api.session(), api.session(), api.session()
        spare_turn = api.chat(spare, "SAY: spare")["id"]
        for turn in [api.chat(a, "SAY: a before"), api.chat(b, "SAY: b before")]:
            assert api.finished(turn["id"])["status"] == "succeeded"
        api.finished(spare_turn)

        # The worker is frozen, so what is submitted now waits in the queue; its blocking pop
        # (one second) runs out first, so no message sits in a frozen socket.
        stack.signal_group(worker, signal.SIGSTOP)
        time.sleep(1.5)
        queued = [api.chat(a, "SAY: a queued"), api.chat(b, "SAY: b queued 1"), api.chat(b, "SAY: b queued 2")]
        followers = [Follower(kind, api, a, {queued[0]["id"]}) for kind in ("ws", "sse")]
        for f in followers:
            f.start()
        client = redis.Redis.from_url(server.url)
        text = redis.Redis.from_url(server.url, decode_responses=True)
        wait_for(lambda: all(f.frames and f.last_id() == stream_ids(text, prefix, a)[-1] for f in followers), 30,
                 what="both clients to catch up with session a")
        events_before = {sid: stream_ids(text, prefix, sid) for sid in (a, b)}
        messages_before = queued_messages(client, prefix)
        waiting = [m for msgs in messages_before.values() for m in msgs]
        # A session's first queued turn has its task on the broker; the one behind it ("b queued 2") has none,
        # the worker that records the turn before it sends it.
        heads, behind = queued[:2], queued[2:]
        assert all(any(t["id"].encode() in m for m in waiting) for t in heads), "every queued head has its message"
        assert not any(t["id"].encode() in m for t in behind for m in waiting)
        engine = create_engine(private_database)
        ours_queued = select(func.count()).select_from(Turn).where(
            Turn.status == "queued", Turn.id.in_([uuid.UUID(t["id"]) for t in queued]))
        with engine.connect() as conn:
            queued_rows = conn.scalar(ours_queued)
        assert queued_rows == len(queued)

        time.sleep(1.5)  # > 1 s idle: appendfsync everysec has written everything to the AOF
        server.kill()
        # While Redis is down the web answers 503 redis_unavailable where it needs Redis, at once.
        # (Probed on a session of its own: a stop or delete accepted now is carried out later.)
        results = probe_every_route(api, env, {"session_id": spare, "turn_id": spare_turn}, "redis_unavailable")
        unavailable = {(r[0], r[1]) for r in results if r[2] == 503}
        assert {("POST", f"/api/v1/sessions/{spare}/chat"), ("GET", f"/api/v1/sessions/{spare}/events"),
                ("GET", "/readyz")} <= unavailable, results
        time.sleep(2.0)  # streaming clients ride out the outage
        server.start()

        events_after = {sid: stream_ids(text, prefix, sid) for sid in (a, b)}
        messages_after = queued_messages(client, prefix)
        assert events_after == events_before, "events acknowledged before the restart were lost"
        acknowledged = [t["queued_event_id"] for t in queued]  # ids the web returned to the client
        assert all(i in events_after[t["session_id"]] for i, t in zip(acknowledged, queued, strict=True))
        assert messages_after == messages_before, "queued Celery messages were lost"
        with engine.connect() as conn:
            assert conn.scalar(ours_queued) == queued_rows, "turns queued before the restart are gone"
        engine.dispose()

        # The worker wakes to a dead connection and reconnects by itself; the web already has.
        stack.signal_group(worker, signal.SIGCONT)
        for turn in queued:
            ended = api.finished(turn["id"])
            assert ended["status"] == "succeeded", (ended, [json.loads(f["e"])["data"] for _, f in text.xrange(
                f"{prefix}:events:{turn['session_id']}") if turn["id"] in f["e"]][-6:])
        after = api.chat(b, "SAY: b after the restart")
        assert api.finished(after["id"])["status"] == "succeeded"
        assert requests.get(api.base + "/readyz", timeout=10).status_code == 200
        assert worker.alive() and web.alive()

        figures = []
        stored = stream_ids(text, prefix, a)
        assert stored[:len(events_before[a])] == events_before[a]
        for f in followers:
            f.result()
            figures.append(check_delivery(f, stored))
            assert f.connections == 1, f"{f.kind} stream did not survive the Redis restart: {f.drops}"
        counted = sum(len(v) for v in events_before.values())
        report("redis_restarted", {"faults_injected": 1, "events_before": counted,
                                   "events_after_restart": sum(len(v) for v in events_after.values()),
                                   "events_lost": len({i for v in events_before.values() for i in v}
                                                      - {i for v in events_after.values() for i in v}),
                                   "queued_messages_before": len(waiting),
                                   "queued_messages_after": sum(len(v) for v in messages_after.values()),
                                   "queued_turns_before": queued_rows, "queued_turns_after": queued_rows,
                                   "routes_probed": len(results), "answered_503": len(unavailable),
                                   "not_503": [f"{r[0]} {r[1]} {r[2]}" for r in results if r[2] != 503],
                                   "clients": figures})
    finally:
        for f in followers:
            f.halt.set()
        for process in (worker, web, proxy):
            if process is not None:
                if process.alive():
                    stack.signal_group(process, signal.SIGCONT)
                process.stop()
        server.stop()
        remove_containers(docker_client, prefix)


# ---------------------------------------------------------------------------------------------
# 5. Postgres restarted.


class PostgresCluster:
    """A private Postgres cluster (trust auth, loopback, a free port) in a temp dir, run as the postgres user."""

    def __init__(self) -> None:
        self.port, self.dir = stack.free_port(), Path(tempfile.mkdtemp(prefix="ccd-pg-"))
        self.data = self.dir / "data"
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # postgres refuses root

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/ccd_faults"

    def run(self, *argv: str) -> None:
        exe = shutil.which(argv[0])
        assert exe, f"{argv[0]} is not installed"
        proc = subprocess.run([*self.prefix, exe, *argv[1:]], capture_output=True, text=True)
        assert proc.returncode == 0, f"{argv}: {proc.stdout}\n{proc.stderr}"

    def init(self) -> "PostgresCluster":
        if self.prefix:
            shutil.chown(self.dir, "postgres", "postgres")
        self.run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-locale",
                 "--no-sync")
        return self.start()

    def start(self) -> "PostgresCluster":
        self.run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "postgres.log"), "-w", "-o",
                 f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1", "start")
        return self

    def stop(self) -> None:
        self.run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        subprocess.run([*self.prefix, shutil.which("pg_ctl") or "pg_ctl", "-D", str(self.data), "-m", "immediate",
                        "stop"], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# Valid bodies, so these routes get as far as the database.
OUTAGE_BODIES = {"/api/v1/sessions": {"workspace": {"type": "ephemeral"}},
                 "/api/v1/batches": {"items": [{"prompt": "SAY: during the outage"}]},
                 "/api/v1/tokens/revoke": {"jti": "fault5-probe", "exp": int(time.time()) + 3600}}


def probe_every_route(api: Api, env: dict[str, str], ids: dict[str, str], outage_code: str) -> list[tuple]:
    """Calls every route of the app (ids filled in) during an outage: (method, path, status, code, seconds).

    Never a 500 and never a hang (each call has 20 s): a 5xx is a 503 with `outage_code`. What is
    not a 503 needs no such server (/healthz; revocations live in Redis, turns in Postgres), was
    accepted for the reaper to finish, or was refused for its input first (a 4xx).
    """
    from web import create_app

    ids = {"batch_id": str(uuid.uuid4()), "path": "note.txt", **ids}
    results = []
    for rule in create_app(Settings.from_env(env)).url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:[^:<>]+:)?(\w+)>", lambda m: ids.get(m.group(1), "x"), rule.rule)
        for method in ["WS"] if rule.websocket else sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            started = time.monotonic()
            if method == "WS":
                try:
                    websocket.create_connection(api.base.replace("http", "ws", 1) + path + f"?token={api.token}",
                                                timeout=20).close()
                    status, code = 101, None
                except websocket.WebSocketBadStatusException as exc:
                    status, code = exc.status_code, json.loads(exc.resp_body)["error"]["code"]
            else:
                kwargs = {"json": OUTAGE_BODIES.get(path, {"prompt": "SAY: during the outage"})} \
                    if method in ("POST", "PUT", "PATCH") else {}
                resp = api.call(method, path, None, timeout=20, **kwargs)
                status = resp.status_code
                code = resp.json()["error"]["code"] if status >= 400 else None
            results.append((method, path, status, code, round(time.monotonic() - started, 2)))
    wrong = [r for r in results if r[2] >= 500 and (r[2], r[3]) != (503, outage_code)]
    assert not wrong, f"during the outage: wrong errors {wrong}"
    return results


def test_postgres_restart_answers_503_resumes_by_itself_and_leaves_no_turn_running(stack_env, token, settings,
                                                                                   docker_client):
    cluster = PostgresCluster().init()
    prefix = f"{settings.key_prefix}pg"
    port = stack.free_port()
    env = private_env(stack_env, CCD_PORT=str(port), DATABASE_URL=cluster.url, CCD_KEY_PREFIX=prefix,
                      CCD_MODEL_PROXY_PORT=str(stack.free_port()))
    web = worker = proxy = None
    followers: list[Follower] = []
    try:
        prepare_database(cluster.url)
        proxy = stack.start_proxy(env, name="model-proxy-fault5")  # it checks sessions in this test's database
        web = stack.start_web(env, port, name="web-fault5")
        worker = stack.start_worker(env, name="worker-fault5")
        api = Api(f"http://127.0.0.1:{port}", token("fault5-owner"))
        a, b = api.session(), api.session()
        for turn in [api.chat(a, "SAY: a before"), api.chat(b, "SAY: b before")]:
            assert api.finished(turn["id"])["status"] == "succeeded"
        long = api.chat(a, "SLOW: 6")
        followers = [Follower(kind, api, a, {long["id"]}) for kind in ("ws", "sse")]
        for f in followers:
            f.start()
        events = redis.Redis.from_url(settings.redis_url, decode_responses=True)

        def turn_events(kinds: set[str]) -> list[dict]:
            out = []
            for _, fields in events.xrange(f"{prefix}:events:{a}"):
                event = json.loads(fields["e"])
                if event["turn_id"] == long["id"] and event["type"] in kinds:
                    out.append(event)
            return out
        wait_for(lambda: len(turn_events({"claude.stream_event"})) >= 4, 60, what="the long turn to stream")

        cluster.stop()
        outage_started = time.monotonic()
        results = probe_every_route(api, env, {"session_id": a, "turn_id": long["id"]}, "database_unavailable")
        essential = {("GET", "/api/v1/sessions"), ("POST", "/api/v1/sessions"), ("GET", f"/api/v1/sessions/{a}"),
                     ("POST", f"/api/v1/sessions/{a}/chat"), ("GET", f"/api/v1/sessions/{a}/events"),
                     ("GET", f"/api/v1/turns/{long['id']}"), ("WS", f"/api/v1/sessions/{a}/stream"),
                     ("GET", "/readyz")}
        assert essential <= {(r[0], r[1]) for r in results if r[2] == 503}, results
        assert ("GET", "/healthz", 200, None) == next(r[:4] for r in results if r[1] == "/healthz")

        # The turn finishes in its container while the database is down (its final event is published).
        wait_for(lambda: turn_events(FINAL), 60, what="the long turn's final event")
        time.sleep(CHECK_EVERY_SECONDS + 1)  # the worker retries its record; the streams check their session
        outage = time.monotonic() - outage_started
        cluster.start()

        # Service resumes by itself: the pools reconnect (pre-ping), no restart of web or worker.
        wait_for(lambda: requests.get(api.base + "/readyz", timeout=10).status_code == 200, 30, what="readyz")
        after = api.chat(b, "SAY: b after the restart")
        assert api.finished(after["id"])["status"] == "succeeded", worker.tail()

        # No turn is left running: the one that ended during the outage is recorded, with one final event.
        def settled():
            turn = api.turn(long["id"])
            return turn if turn["status"] not in OPEN_TURN else None
        try:
            final = wait_for(settled, 60, what="the turn that ended during the outage to be recorded")
        except AssertionError:
            raise AssertionError(f"turn {long['id']} left {api.turn(long['id'])['status']!r} after Postgres came "
                                 f"back; worker log:\n{worker.tail(30)}") from None
        finals = turn_events(FINAL)
        assert [e["type"] for e in finals] == [final_event_type(final["status"])], finals
        assert final["status"] == "succeeded" or final["error"], final
        engine = create_engine(cluster.url)
        with engine.connect() as conn:
            assert conn.scalar(select(func.count()).select_from(Turn).where(Turn.status == "running")) == 0
        engine.dispose()
        # Clients streaming through the outage were never cut off, and got every event once.
        stored = stream_ids(events, prefix, a)
        figures = []
        for f in followers:
            f.result()
            figures.append(check_delivery(f, stored))
            assert f.connections == 1, f"{f.kind} stream did not survive the Postgres restart: {f.drops}"
        report("postgres_restarted", {"faults_injected": 1, "outage_seconds": round(outage, 1),
                                      "routes_probed": len(results), "answered_503": sum(r[2] == 503 for r in results),
                                      "not_503": [f"{r[0]} {r[1]} {r[2]}" for r in results if r[2] != 503],
                                      "slowest_answer_s": max(r[4] for r in results),
                                      "long_turn": final["status"], "clients": figures})
    finally:
        for f in followers:
            f.halt.set()
        for process in (worker, web, proxy):
            if process is not None:
                process.stop()
        remove_containers(docker_client, prefix)
        keys = list(redis.Redis.from_url(settings.redis_url).scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            redis.Redis.from_url(settings.redis_url).delete(*keys)
        cluster.remove()
