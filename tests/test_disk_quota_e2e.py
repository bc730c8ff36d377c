"""Disk exhaustion: a session that writes past config.limits.disk_mb is stopped (disk_quota), however it hides
what it wrote, and one under its limit is left alone. The writes are made by the agent's own Bash tool."""
from __future__ import annotations

import pytest

from tests import stack
from tests.test_e2e import Api
from workers import disk_quota
from workers.runtime import DockerRuntime

pytestmark = pytest.mark.docker
OWNER = "disk-owner"
LIMITS = {"memory_mb": 512, "cpus": 0.5, "pids": 128}


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token(OWNER))


@pytest.fixture(scope="module")
def disk_worker(stack_env):
    """A second worker of the same host whose disk watcher looks every 2 s (the stack's looks at the default)."""
    env = {**stack_env["env"], "CCD_DISK_CHECK_SECONDS": "2", "CCD_WORKER_METRICS_PORT": str(stack.free_port())}
    worker = stack.start_worker(env, name="disk-worker", concurrency=1)
    yield worker
    worker.stop()


def started_session(api: Api, disk_mb: int) -> str:
    sid = api.session(limits={**LIMITS, "disk_mb": disk_mb})["id"]
    assert api.finished_turn(api.chat(sid, "SAY: ready")["id"])["status"] == "succeeded"
    return sid


def events_of(api: Api, sid: str) -> list[dict]:
    return api.call("GET", f"/api/v1/sessions/{sid}/events?limit=1000", 200)["items"]


def quota_events(api: Api, sid: str) -> list[dict]:
    return [e for e in events_of(api, sid) if e["type"] == "session.status" and e["data"].get("reason") == "disk_quota"]


def test_a_turn_writing_past_the_disk_limit_fails_with_disk_quota_and_its_session_stops(api, disk_worker):
    sid = started_session(api, disk_mb=20)
    # The sleep keeps the turn running: the watcher has to stop it mid-turn, the writer with it.
    turn = api.chat(sid, "RUN: dd if=/dev/zero of=/workspace/fill bs=1M count=60 && sleep 100")
    done = api.finished_turn(turn["id"], timeout=80)
    assert done["status"] == "failed" and done["reason"] == "disk_quota", done
    assert "over its disk limit of 20 MB" in done["error"]
    session = api.session_status(sid, "stopped")
    assert "config.limits.disk_mb" in session["error"]
    statuses = quota_events(api, sid)
    assert [e["data"]["status"] for e in statuses] == ["stopping", "stopped"], statuses
    final = [e for e in events_of(api, sid) if e["turn_id"] == turn["id"] and e["type"] == "turn.failed"]
    assert final and final[0]["data"]["reason"] == "disk_quota"


def test_hidden_and_preallocated_writes_are_counted_and_a_session_under_its_limit_is_untouched(api, disk_worker):
    # Under its limit: 5 MB written and a 1 GiB sparse file, which holds (and costs) nothing.
    calm = started_session(api, disk_mb=50)
    turn = api.chat(calm, "RUN: dd if=/dev/zero of=/workspace/data bs=1M count=5 && truncate -s 1G /workspace/sparse"
                          " && echo written")
    assert api.finished_turn(turn["id"])["status"] == "succeeded"
    # Over its limit, hidden from the agent-side view: 60 MB reserved past the end of an empty file (its size says
    # 0; the engine's own `docker system df` counts 0 too), in a directory no one but root may read.
    hider = started_session(api, disk_mb=20)
    turn = api.chat(hider, "RUN: mkdir /home/agent/.h && touch /home/agent/.h/x && fallocate -n -l 60M "
                           "/home/agent/.h/x && chmod 000 /home/agent/.h && echo hidden")
    assert api.finished_turn(turn["id"])["status"] == "succeeded"
    stopped = api.session_status(hider, "stopped", timeout=60)
    assert "over its disk limit of 20 MB" in stopped["error"]
    assert [e["data"]["status"] for e in quota_events(api, hider)] == ["stopping", "stopped"]
    # The pass that stopped the hider measured the calm session too (it was written first).
    assert api.call("GET", f"/api/v1/sessions/{calm}", 200)["status"] == "ready"
    assert quota_events(api, calm) == []
    assert api.finished_turn(api.chat(calm, "SAY: still here")["id"])["status"] == "succeeded"


def test_a_disk_limit_over_the_ceiling_is_refused_with_422(api, stack_env):
    ceiling = stack_env["settings"].max_disk_mb
    err = api.call("POST", "/api/v1/sessions", 422, json={"config": {"limits": {"disk_mb": ceiling + 1}}})["error"]
    assert err["code"] == "limit_exceeded" and err["field"] == "config.limits.disk_mb" and err["limit"] == ceiling


def test_a_walk_cut_short_names_its_session_and_a_volume_gone_meanwhile_is_not_left_behind(
        stack_env, docker_client, monkeypatch):
    settings = stack_env["settings"]
    runtime = DockerRuntime(settings)
    made = [docker_client.volumes.create(f"{settings.key_prefix}-walk-{i}", labels={"ccd.prefix": settings.key_prefix})
            for i in range(2)]
    # Many files: walking them takes far longer than the helper takes to start.
    many = "[open(f'/v/{i}', 'w').close() for i in range(100000)]"
    docker_client.containers.run(settings.image, ["python3", "-c", many], user="0", network_mode="none",
                                 volumes={made[0].name: {"bind": "/v", "mode": "rw"}}, remove=True)
    gone = f"{settings.key_prefix}-deleted-meanwhile-workspace"  # listed, then deleted before the helper mounted it
    used, cut = disk_quota.measure(runtime, {"a": [made[0].name], "b": [made[1].name], "c": [gone]})
    assert set(used) == {"a", "b", "c"} and used["a"] > 0 and cut == set()
    assert not docker_client.volumes.list(filters={"name": gone})  # the helper's mount made it again: removed
    monkeypatch.setattr(disk_quota, "SESSION_WALK_SECONDS", 0.05)  # a's walk runs out of time; b's is quick
    used, cut = disk_quota.measure(runtime, {"a": [made[0].name], "b": [made[1].name]})
    assert set(used) == {"b"} and cut == {"a"}
    for volume in made:
        volume.remove()
