"""The web tier (real gunicorn, both worker classes) closes connections that never send a whole request, so a flood
of idle sockets cannot hold its connections; a WebSocket that is quiet for longer is not cut."""
from __future__ import annotations

import json
import socket
import time

import pytest
import redis
import requests
import websocket

from core.envelope import Event
from core.events import EventLog
from tests import stack

KEEPALIVE = 1


@pytest.fixture(params=["gevent", "gthread"])
def web(request, settings):
    port = stack.free_port()
    env = stack.service_env(settings, "127.0.0.1", "http://127.0.0.1:9", port, WEB_WORKER_CLASS=request.param,
                            WEB_WORKERS="1", WEB_KEEPALIVE_SECONDS=str(KEEPALIVE), CCD_WS_PING_SECONDS="120")
    process = stack.start_web(env, port, name=f"web-idle-{request.param}")
    yield f"http://127.0.0.1:{port}"
    process.stop()


def opened(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    return sock


def test_silent_and_stalled_connections_are_closed_after_the_keepalive_time(web):
    started = time.monotonic()
    silent = [opened(web) for _ in range(200)]
    stalled = opened(web)
    stalled.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # headers begun, never finished
    for sock in silent + [stalled]:
        assert sock.recv(65536) == b""  # the server closed it, without an answer
        sock.close()
    waited = time.monotonic() - started
    assert KEEPALIVE - 0.5 < waited < KEEPALIVE + 8, waited
    assert requests.get(f"{web}/healthz", timeout=10).ok  # and it serves the next client


def test_a_quiet_websocket_outlives_the_keepalive_time(web, settings, token):
    owner = token("idle-owner")
    resp = requests.post(f"{web}/api/v1/sessions", json={"workspace": {"type": "ephemeral"}}, timeout=10,
                         headers={"Authorization": f"Bearer {owner}"})
    assert resp.status_code == 201, resp.text
    sid = resp.json()["id"]
    ws = websocket.create_connection(web.replace("http", "ws", 1) + f"/api/v1/sessions/{sid}/stream?token={owner}",
                                     timeout=30)
    time.sleep(KEEPALIVE * 3)
    log = EventLog(redis.Redis.from_url(settings.redis_url, decode_responses=True), settings.key_prefix,
                   settings.events_maxlen)
    event_id = log.publish(Event(session_id=sid, type="claude.stream_event", data={"n": 1}))
    deadline = time.monotonic() + 20
    ids = []
    while event_id not in ids and time.monotonic() < deadline:
        frame = ws.recv()
        ids.append(json.loads(frame).get("id"))
    ws.close()
    assert event_id in ids
