"""A private stack for one benchmark run: its own database, key prefix and network; web, worker and proxy
processes; the scripted model server. Everything it makes is removed when the run ends."""
from __future__ import annotations

import json
import os
import secrets
import time
import uuid
from dataclasses import replace

import redis
import requests
import websocket
from sqlalchemy.engine import make_url

from client.tokens import mint_token
from core.db import make_engine, make_session_factory
from core.events import EventLog
from core.migrate import prepare_database
from core.queues import TaskSender
from core.settings import DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL, Settings
from tests import stack
from tests.model_server import ModelServer
from workers.runtime import DockerRuntime


def bench_settings(run_id: str) -> Settings:
    """Settings of a benchmark run: a database and key prefix of its own."""
    base = make_url(os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL)
    return Settings.from_env({}, jwt_secret=secrets.token_hex(32),
                             database_url=base.set(database=f"ccd_bench_{run_id}").render_as_string(hide_password=False),
                             redis_url=os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL, key_prefix=f"ccdb{run_id}",
                             session_network=f"ccdb{run_id}-net", image=os.environ.get("CCD_IMAGE") or "ccd-session:latest",
                             anthropic_api_key="sk-bench-not-a-real-key")


class BenchStack:
    """The real service on loopback, as `make run` starts it (gunicorn gevent with 2 processes, one worker)."""

    def __init__(self, log=print, web_processes: int = 2, worker_concurrency: int = 4, pool_size: int = 2) -> None:
        self.log = log
        self.run_id = secrets.token_hex(3)
        self.settings = bench_settings(self.run_id)
        self.web_processes, self.worker_concurrency, self.pool_size = web_processes, worker_concurrency, pool_size
        self.processes: list[stack.Process] = []

    def __enter__(self) -> "BenchStack":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        s = self.settings
        self.docker = stack.ensure_dockerd()
        self.log("building (or reusing) the session image")
        stack.build_image(s.image)
        prepare_database(s.database_url)
        self.gateway = stack.network_gateway(self.docker, s.session_network)
        self.model = ModelServer("127.0.0.1", 0).start()
        self.port = stack.free_port()
        self.env = stack.service_env(s, self.gateway, self.model.url, self.port, LOG_LEVEL="WARNING",
                                     CCD_WARM_POOL_SIZE=str(self.pool_size),
                                     CCD_OWNER_MAX_QUEUED_TURNS="20000", CCD_OWNER_MAX_RUNNING_TURNS="20000",
                                     CCD_OWNER_MAX_SESSIONS="1000", CCD_MAX_BODY_BYTES="67108864")
        self.log("starting the model proxy, web, worker")
        self.processes.append(stack.start_proxy({**self.env, "LOG_LEVEL": "INFO"}, name="bench-proxy"))
        self.processes.append(stack.start_web(self.env, self.port, also_on=self.gateway, name="bench-web",
                                              processes=self.web_processes))
        self.processes.append(stack.start_worker({**self.env, "LOG_LEVEL": "INFO"}, name="bench-worker",
                                                 concurrency=self.worker_concurrency))
        self.settings = replace(s, anthropic_base_url=self.model.url,
                                model_proxy_port=int(self.env["CCD_MODEL_PROXY_PORT"]))
        self.base, self.ws_base = f"http://127.0.0.1:{self.port}/api/v1", f"ws://127.0.0.1:{self.port}/api/v1"
        self.token = mint_token(s.jwt_secret, "bench", 6 * 3600)
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {self.token}"
        self.redis = redis.Redis.from_url(s.redis_url, decode_responses=True)
        self.events = EventLog(self.redis, s.key_prefix, s.events_maxlen)
        self.engine = make_engine(s)
        self.db = make_session_factory(self.engine)
        self.sender = TaskSender(s)
        self.runtime = DockerRuntime(self.settings, self.docker)

    def close(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        if hasattr(self, "model"):
            self.model.stop()
        if hasattr(self, "engine"):
            self.engine.dispose()
        if hasattr(self, "docker"):
            stack.remove_prefixed(self.docker, self.settings.key_prefix, self.settings.session_network)
        client = redis.Redis.from_url(self.settings.redis_url)
        keys = list(client.scan_iter(match=f"{self.settings.key_prefix}*", count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])
        stack.drop_database(self.settings.database_url)

    # The API, as a client program uses it.
    def call(self, method: str, path: str, expect: int = 200, **kwargs) -> dict:
        response = self.http.request(method, self.base + path, timeout=120, **kwargs)
        if response.status_code != expect:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:500]}")
        return response.json()

    def new_session(self, config: dict | None = None, timeout: float = 120) -> dict:
        """A session, ready for turns."""
        row = self.call("POST", "/sessions", 201, json={"config": config or {}})
        return self.wait_status(row["id"], "ready", timeout)

    def wait_status(self, session_id: str, status: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            row = self.call("GET", f"/sessions/{session_id}")
            if row["status"] == status:
                return row
            if row["status"] == "failed":
                raise RuntimeError(f"session {session_id} failed: {row.get('error')}")
            time.sleep(0.05)
        raise RuntimeError(f"session {session_id} did not become {status} within {timeout:.0f}s")

    def socket(self, session_id: str, since: str | None = None) -> websocket.WebSocket:
        """A WebSocket following the session's events (only new ones unless `since`)."""
        url = f"{self.ws_base}/sessions/{session_id}/stream?token={self.token}"
        if since is None:
            since = self.events.last_id(session_id)
        return websocket.create_connection(f"{url}&since={since}", timeout=120)

    def container_of(self, session_id: str):
        return self.runtime.find(session_id)


class SlowClient(RuntimeError):
    """The server dropped the socket for falling too far behind (close code 4008); resume with since=."""


def next_frame(ws: websocket.WebSocket) -> dict:
    """The next event frame; RuntimeError with the server's code and reason when it closes the socket."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
            raise (SlowClient if code == 4008 else RuntimeError)(f"the server closed the stream: {code} {data[2:].decode(errors='replace')}")
        if opcode in (websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY):
            return json.loads(data)


def receive_until(ws: websocket.WebSocket, turn_id: str, final=("turn.completed", "turn.failed", "turn.cancelled")):
    """Reads frames until the turn's final event; returns (that event, the monotonic time it arrived)."""
    while True:
        frame = next_frame(ws)
        if frame.get("turn_id") == turn_id and frame.get("type") in final:
            return frame, time.monotonic()


def new_id() -> str:
    return str(uuid.uuid4())
