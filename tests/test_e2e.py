"""End to end with every real part: web, worker, Postgres, Redis, Docker, Claude Code, model server."""
from __future__ import annotations

import json
import threading
import time

import pytest
import redis
import requests
import websocket

from tests.conftest import wait_for

pytestmark = pytest.mark.docker
FINAL = {"turn.completed", "turn.failed", "turn.cancelled"}


class Api:
    """A thin HTTP client for the tests, as a caller program would use the API."""

    def __init__(self, base: str, token: str) -> None:
        self.base, self.headers = base, {"Authorization": f"Bearer {token}"}

    def call(self, method: str, path: str, expect: int, **kwargs) -> dict:
        resp = requests.request(method, self.base + path, headers=self.headers, timeout=30, **kwargs)
        assert resp.status_code == expect, (method, path, resp.status_code, resp.text)
        return resp.json()

    def session(self, **config) -> dict:
        return self.call("POST", "/api/v1/sessions", 201, json={"workspace": {"type": "ephemeral"}, "config": config})

    def chat(self, sid: str, prompt: str) -> dict:
        return self.call("POST", f"/api/v1/sessions/{sid}/chat", 202, json={"prompt": prompt})

    def finished_turn(self, turn_id: str, timeout: float = 90) -> dict:
        def done():
            turn = self.call("GET", f"/api/v1/turns/{turn_id}", 200)
            return turn if turn["status"] not in ("queued", "running") else None
        return wait_for(done, timeout, what=f"turn {turn_id} to finish")

    def session_status(self, sid: str, status: str, timeout: float = 60) -> dict:
        def reached():
            body = self.call("GET", f"/api/v1/sessions/{sid}", 200)
            return body if body["status"] == status else None
        return wait_for(reached, timeout, what=f"session {sid} to be {status}")


class Collector(threading.Thread):
    """A WebSocket client that records every frame until it has seen `turns` final turn events."""

    def __init__(self, url: str, turns: int) -> None:
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(url, timeout=120)
        self.turns, self.frames, self.error = turns, [], None

    def run(self) -> None:
        try:
            while sum(f["type"] in FINAL for f in self.frames) < self.turns:
                self.frames.append(json.loads(self.ws.recv()))
        except Exception as exc:  # surfaced by the test's assertions
            self.error = exc
        finally:
            self.ws.close()

    def result(self, timeout: float = 120) -> list[dict]:
        self.join(timeout)
        assert not self.is_alive(), f"stream did not deliver {self.turns} final events: {self.frames[-3:]}"
        assert self.error is None, self.error
        return self.frames


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("e2e-owner"))


def ws_url(stack_env, token, sid: str, since: str | None = None) -> str:
    url = f"{stack_env['ws']}/api/v1/sessions/{sid}/stream?token={token('e2e-owner')}"
    return url + (f"&since={since}" if since else "")


def container_of(docker_client, settings, sid: str):
    return docker_client.containers.get(f"{settings.key_prefix}-session-{sid}")


def test_two_turns_stream_live_resume_the_conversation_and_clean_up(stack_env, api, token, docker_client, settings):
    sid = api.session()["id"]
    live = Collector(ws_url(stack_env, token, sid), turns=2)
    live.start()

    first = api.chat(sid, "RUN: echo turn-one > /workspace/note.txt && cat /workspace/note.txt")
    second = api.chat(sid, "SAY: the second answer")
    assert (first["seq"], second["seq"]) == (1, 2)
    t1, t2 = api.finished_turn(first["id"]), api.finished_turn(second["id"])

    # Polling gives the final results, with usage, cost and duration from Claude Code's result line.
    assert t1["status"] == "succeeded" and t1["result"].strip() == "BASH-RESULT: turn-one", t1
    assert t2["status"] == "succeeded" and t2["result"] == "the second answer", t2
    for turn in (t1, t2):
        assert turn["usage"]["output_tokens"] > 0 and turn["cost_usd"] > 0 and turn["duration_ms"] > 0
        assert turn["first_event_id"] and turn["last_event_id"] and turn["error"] is None
    listed = api.call("GET", f"/api/v1/sessions/{sid}/turns", 200)
    assert [t["status"] for t in listed["items"]] == ["succeeded", "succeeded"]

    # The Bash tool really ran in the container's /workspace.
    note = container_of(docker_client, settings, sid).exec_run(["cat", "/workspace/note.txt"], user="agent")
    assert note.output.decode().strip() == "turn-one"

    # Turn 2 resumed: the model saw turn 1's prompt and tool result in its request.
    turn2_requests = [r for r in stack_env["model"].tool_requests()
                      if "the second answer" in json.dumps(r["messages"])]
    assert turn2_requests, "the model server never received turn 2"
    history = json.dumps(turn2_requests[0]["messages"])
    assert "RUN: echo turn-one" in history and "turn-one" in history.split("RUN: echo turn-one", 1)[1]

    # The live client saw every event of both turns, in order, ending with turn.completed.
    frames = live.result()
    stored = redis.Redis.from_url(settings.redis_url, decode_responses=True).xrange(f"{settings.key_prefix}:events:{sid}")
    assert [f["id"] for f in frames] == [entry_id for entry_id, _ in stored]
    assert frames[-1]["type"] == "turn.completed" and frames[-1]["turn_id"] == second["id"]
    for turn in (first, second):
        kinds = [f["type"] for f in frames if f["turn_id"] == turn["id"]]
        assert kinds[:2] == ["turn.queued", "turn.started"] and kinds[-2:] == ["claude.result", "turn.completed"]
        assert any(k == "claude.stream_event" for k in kinds) and "claude.assistant" in kinds
    started = [f["turn_id"] for f in frames if f["type"] == "turn.started"]
    assert started == [first["id"], second["id"]]
    claude = next(f for f in frames if f["type"] == "claude.system")
    assert claude["data"]["type"] == "system" and claude["data"]["subtype"] == "init"
    assert all(f["session_id"] == sid and f["ts"].endswith("Z") for f in frames)

    # A later client resuming from an event of turn 1 gets exactly the events after it.
    pivot = next(i for i, f in enumerate(frames) if f["type"] == "claude.assistant")
    late = Collector(ws_url(stack_env, token, sid, since=frames[pivot]["id"]), turns=2)
    late.start()
    assert late.result() == frames[pivot + 1:]

    # Stop: the container stops, the session can be started again by the next chat.
    api.call("POST", f"/api/v1/sessions/{sid}/stop", 202)
    api.session_status(sid, "stopped")
    assert container_of(docker_client, settings, sid).status == "exited"
    third = api.finished_turn(api.chat(sid, "SAY: awake again")["id"])
    assert third["status"] == "succeeded" and third["result"] == "awake again"
    note = container_of(docker_client, settings, sid).exec_run(["cat", "/workspace/note.txt"], user="agent")
    assert note.output.decode().strip() == "turn-one", "the workspace survived the stop"

    # Delete: container, volumes and events are gone, the row says deleted.
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
    api.session_status(sid, "deleted")
    assert not docker_client.containers.list(all=True, filters={"label": f"ccd.session={sid}"})
    assert not docker_client.volumes.list(filters={"label": f"ccd.session={sid}"})
    assert not redis.Redis.from_url(settings.redis_url).exists(f"{settings.key_prefix}:events:{sid}")


def test_container_is_hardened(stack_env, api, docker_client, settings):
    sid = api.session(limits={"memory_mb": 512, "cpus": 0.5, "pids": 128})["id"]
    api.session_status(sid, "ready")
    attrs = container_of(docker_client, settings, sid).attrs
    host = attrs["HostConfig"]
    assert attrs["Config"]["User"] == "agent"
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"]
    assert host["Memory"] == 512 * 1024 * 1024 and host["NanoCpus"] == 500_000_000 and host["PidsLimit"] == 128
    assert host["Init"] is True and not host["Privileged"]
    assert attrs["Config"]["Labels"]["ccd.session"] == sid and attrs["Config"]["Labels"]["ccd.owner"] == "e2e-owner"
    assert list(attrs["NetworkSettings"]["Networks"]) == [settings.session_network]
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert set(mounts) == {"/workspace", "/home/agent"} and all(m["Type"] == "volume" for m in mounts.values())
    assert not any("docker.sock" in (m.get("Source") or "") for m in attrs["Mounts"])
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_model_endpoint_failure_fails_the_turn_and_the_session_stays_usable(stack_env, api, token):
    sid = api.session()["id"]
    live = Collector(ws_url(stack_env, token, sid), turns=2)
    live.start()
    failed = api.finished_turn(api.chat(sid, "FAIL: 500")["id"])
    assert failed["status"] == "failed" and "500" in failed["error"], failed
    after = api.finished_turn(api.chat(sid, "SAY: still here")["id"])
    assert after["status"] == "succeeded" and after["result"] == "still here"
    frames = live.result()
    finals = [f for f in frames if f["type"] in FINAL]
    assert [f["type"] for f in finals] == ["turn.failed", "turn.completed"]
    assert "500" in finals[0]["data"]["error"]
    assert api.call("GET", f"/api/v1/sessions/{sid}", 200)["status"] == "ready"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def exec_events(docker_client, container_id: str, since: float, until: float) -> list[dict]:
    """The `docker exec`s started in the container between the two times (from the engine's event log)."""
    return list(docker_client.events(since=since, until=until, decode=True,
                                     filters={"container": container_id, "event": "exec_start"}))


def test_a_turn_is_handed_to_the_containers_turn_agent_without_a_docker_exec(stack_env, api, docker_client, settings):
    sid = api.session()["id"]
    api.session_status(sid, "ready")
    container = container_of(docker_client, settings, sid)
    assert container.attrs["Config"]["Cmd"][-1] == "serve" and container.attrs["Config"]["OpenStdin"]
    since = time.time() - 1
    turn = api.finished_turn(api.chat(sid, "RUN: echo agent-ran")["id"])
    assert turn["status"] == "succeeded" and turn["result"].strip() == "BASH-RESULT: agent-ran", turn
    assert exec_events(docker_client, container.id, since, time.time() + 1) == []
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_a_container_made_before_the_turn_agent_still_runs_turns_by_exec(stack_env, api, docker_client, settings):
    """A session whose container was made by an earlier version (`sleep infinity`, no stdin) keeps working."""
    sid = api.session()["id"]
    api.session_status(sid, "ready")
    current = container_of(docker_client, settings, sid)
    attrs, mounts = current.attrs, current.attrs["Mounts"]
    current.remove(force=True)
    old = docker_client.containers.create(
        settings.image, ["sleep", "infinity"], name=attrs["Name"].lstrip("/"), user="agent", init=True,
        working_dir="/workspace", labels=attrs["Config"]["Labels"], network=settings.session_network,
        volumes={m["Name"]: {"bind": m["Destination"], "mode": "rw"} for m in mounts})
    old.start()
    since = time.time() - 1
    turn = api.finished_turn(api.chat(sid, "SAY: by exec")["id"])
    assert turn["status"] == "succeeded" and turn["result"] == "by exec", turn
    assert exec_events(docker_client, old.id, since, time.time() + 1), "the turn ran without an exec?"
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
