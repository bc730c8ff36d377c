"""The warm pool, end to end: sessions take started, hardened containers that no other session ever gets, the pool
is refilled, removal takes a taken container's volumes with it, and the container check leaves the pool alone."""
from __future__ import annotations

import statistics
import threading
import time
import uuid

import pytest
import redis
from sqlalchemy import update

from core.db import make_engine, make_session_factory, transaction
from core.limits import DEFAULT_LIMITS
from core.models import Session
from tests.conftest import wait_for
from tests.test_e2e import Api
from workers import containers
from workers.context import WorkerContext
from workers.pool import WarmPool
from workers.runtime import DockerRuntime

pytestmark = pytest.mark.docker
COLD = {"limits": {"memory_mb": 1024, "cpus": 0.5, "pids": 256}}
# What makes a container hardened, beside its limits: the same for a pool container and a cold one.
HARDENING = ("CapDrop", "SecurityOpt", "ReadonlyRootfs", "Tmpfs", "Init", "Privileged", "NetworkMode", "CapAdd")


@pytest.fixture(scope="module")
def pool(stack_env):
    """This run's warm pool on this host, as the worker keeps it in Redis."""
    settings = stack_env["settings"]
    client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    key = f"{settings.key_prefix}:pool:{settings.host_name}"
    return {"size": settings.warm_pool_size, "ids": lambda: client.lrange(key, 0, -1), "redis": client, "key": key}


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("pool-owner-a"))


def full_pool(pool, docker_client, without: tuple[str, ...] = ()) -> list[str]:
    """The pool's ids once it holds its size of running containers (none of `without`)."""
    def full():
        ids = pool["ids"]()
        running = [i for i in ids if docker_client.containers.get(i).status == "running"]
        return ids if len(running) == pool["size"] and not set(ids) & set(without) else None
    return wait_for(full, 90, 0.2, "the warm pool to be full")


def container_of(docker_client, settings, sid: str):
    return docker_client.containers.get(f"{settings.key_prefix}-session-{sid}")


def taken_session(api, pool, docker_client, settings) -> tuple[str, object]:
    """A new session, ready, and the container it took from the (full) pool."""
    before = full_pool(pool, docker_client)
    sid = api.session()["id"]
    api.session_status(sid, "ready")
    container = container_of(docker_client, settings, sid)
    assert container.id in before, "the session did not get a container the pool had ready"
    return sid, container


def test_pool_size_is_the_configured_one(pool):
    assert pool["size"] == 2, "these tests run with the default CCD_WARM_POOL_SIZE"


def test_a_new_session_takes_a_started_pool_container_hardened_like_a_cold_one(stack_env, api, pool,
                                                                              docker_client):
    settings = stack_env["settings"]
    before = full_pool(pool, docker_client)
    started = {i: docker_client.containers.get(i).attrs["State"]["StartedAt"] for i in before}
    sid = api.session()["id"]
    api.session_status(sid, "ready")
    warm = container_of(docker_client, settings, sid)
    assert warm.id in before, "the session did not get a container the pool had ready"
    assert warm.attrs["State"]["StartedAt"] == started[warm.id], "it was started before the session was made"
    assert warm.attrs["State"]["Running"] and warm.id not in pool["ids"]()

    cold_sid = api.session(**COLD)["id"]
    api.session_status(cold_sid, "ready")
    cold = container_of(docker_client, settings, cold_sid)
    assert cold.id not in before and cold.labels["ccd.session"] == cold_sid, "custom limits start cold"
    assert cold.labels["ccd.owner"] == "pool-owner-a"
    host, cold_host = warm.attrs["HostConfig"], cold.attrs["HostConfig"]
    assert {k: host.get(k) for k in HARDENING} == {k: cold_host.get(k) for k in HARDENING}
    assert warm.attrs["Config"]["User"] == cold.attrs["Config"]["User"] == "agent"
    assert host["CapDrop"] == ["ALL"] and "no-new-privileges" in host["SecurityOpt"] and host["ReadonlyRootfs"]
    assert host["Memory"] == DEFAULT_LIMITS["memory_mb"] * 1024 * 1024 and host["PidsLimit"] == DEFAULT_LIMITS["pids"]
    assert host["NanoCpus"] == int(DEFAULT_LIMITS["cpus"] * 1e9) and cold_host["Memory"] == 1024 * 1024 * 1024
    assert list(warm.attrs["NetworkSettings"]["Networks"]) == [settings.session_network]
    mounts = {m["Destination"]: m for m in warm.attrs["Mounts"]}
    assert set(mounts) == {"/workspace", "/home/agent"} and all(m["Type"] == "volume" for m in mounts.values())

    # A turn runs in the taken container, and the pool is back to its size without it.
    turn = api.finished_turn(api.chat(sid, "RUN: echo pooled > /workspace/p.txt && cat /workspace/p.txt")["id"])
    assert turn["status"] == "succeeded" and "pooled" in turn["result"], turn
    assert warm.exec_run(["cat", "/workspace/p.txt"], user="agent").output.decode().strip() == "pooled"
    refilled = full_pool(pool, docker_client, without=(warm.id,))
    assert set(before) - {warm.id} <= set(refilled), "the untaken one stays; a new one replaces the taken one"
    for s in (sid, cold_sid):
        api.call("DELETE", f"/api/v1/sessions/{s}", 202)


def test_two_owners_at_once_never_get_the_same_container(stack_env, token, pool, docker_client):
    settings = stack_env["settings"]
    before = full_pool(pool, docker_client)
    owners = [Api(stack_env["base"], token(f"pool-owner-{n}")) for n in ("b", "c")]
    made: list[tuple[Api, str]] = []
    threads = [threading.Thread(target=lambda a=a: made.append((a, a.session()["id"]))) for a in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(made) == 2
    for owner, sid in made:
        owner.session_status(sid, "ready")
    got = [container_of(docker_client, settings, sid) for _, sid in made]
    assert got[0].id != got[1].id and {c.id for c in got} <= set(before), "both took warm, different containers"
    assert not {c.id for c in got} & set(pool["ids"]()), "a taken container is never listed again"
    # Deleting one removes its container for good; the other session's keeps running.
    (first, first_sid), (second, second_sid) = made
    first.call("DELETE", f"/api/v1/sessions/{first_sid}", 202)
    first.session_status(first_sid, "deleted")
    assert not docker_client.containers.list(all=True, filters={"id": got[0].id})
    assert docker_client.containers.get(got[1].id).status == "running"
    refilled = full_pool(pool, docker_client)
    assert got[0].id not in refilled and got[1].id not in refilled
    second.call("DELETE", f"/api/v1/sessions/{second_sid}", 202)


def test_deleting_a_session_removes_its_pool_container_and_volumes(stack_env, api, pool, docker_client):
    settings = stack_env["settings"]
    sid, container = taken_session(api, pool, docker_client, settings)
    volumes = [m["Name"] for m in container.attrs["Mounts"]]
    assert len(volumes) == 2 and all(v.startswith(f"{settings.key_prefix}-pool-") for v in volumes)
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
    api.session_status(sid, "deleted")
    assert not docker_client.containers.list(all=True, filters={"id": container.id})
    left = {v.name for v in docker_client.volumes.list(filters={"label": f"ccd.prefix={settings.key_prefix}"})}
    assert not set(volumes) & left, "the taken container's volumes were left behind"


def test_the_container_check_leaves_pool_containers_and_removes_a_taken_one_whose_session_is_gone(
        stack_env, api, pool, docker_client):
    settings = stack_env["settings"]
    ctx = WorkerContext(settings)
    sid, taken = taken_session(api, pool, docker_client, settings)
    volumes = [m["Name"] for m in taken.attrs["Mounts"]]
    listed = full_pool(pool, docker_client, without=(taken.id,))
    # The session is gone (as if its delete never reached this host), its container is not.
    engine = make_engine(settings)
    with transaction(make_session_factory(engine)) as db:
        db.execute(update(Session).where(Session.id == uuid.UUID(sid)).values(status="deleted"))
    engine.dispose()

    containers.check(ctx)  # the stack's beat may have run one first: either way, a check removed it
    assert not docker_client.containers.list(all=True, filters={"id": taken.id})
    left = {v.name for v in docker_client.volumes.list(filters={"label": f"ccd.prefix={settings.key_prefix}"})}
    assert not set(volumes) & left
    for cid in listed:  # untouched: still there, still running, still listed
        assert docker_client.containers.get(cid).status == "running"
    assert set(listed) <= set(pool["ids"]())


def test_a_stopped_pool_container_is_dropped_and_replaced(stack_env, pool, docker_client):
    ctx = WorkerContext(stack_env["settings"])
    before = full_pool(pool, docker_client)
    docker_client.containers.get(before[0]).stop(timeout=0)  # as an engine restart leaves them
    containers.check(ctx)
    assert not docker_client.containers.list(all=True, filters={"id": before[0]})
    refilled = full_pool(pool, docker_client, without=(before[0],))
    assert before[1] in refilled


def test_a_pool_container_a_crash_left_out_of_the_list_is_removed_once_old_and_kept_while_fresh(
        stack_env, pool, docker_client):
    settings = stack_env["settings"]
    warm = WarmPool(settings, DockerRuntime(settings), pool["redis"])
    listed = full_pool(pool, docker_client)
    orphan = docker_client.containers.get(warm._make(warm.config_key()))  # made, never listed: a fill cut short
    volumes = [m["Name"] for m in orphan.attrs["Mounts"]]
    assert orphan.status == "running" and len(volumes) == 2
    warm.prune()
    assert docker_client.containers.get(orphan.id), "a fresh one may be a fill in flight: it stays"
    warm.orphan_seconds = 0  # as if it were old
    assert warm.prune() == 1
    assert not docker_client.containers.list(all=True, filters={"id": orphan.id})
    left = {v.name for v in docker_client.volumes.list(filters={"label": f"ccd.prefix={settings.key_prefix}"})}
    assert not set(volumes) & left
    assert pool["ids"]() == listed and all(docker_client.containers.get(i).status == "running" for i in listed)


def test_a_taken_container_that_stopped_is_started_again_with_its_workspace(stack_env, api, pool, docker_client):
    """As after an engine restart: the session is marked stopped, and its next turn starts the same container."""
    settings = stack_env["settings"]
    sid, container = taken_session(api, pool, docker_client, settings)
    turn = api.finished_turn(api.chat(sid, "RUN: echo kept > /workspace/k.txt && echo written")["id"])
    assert turn["status"] == "succeeded", turn
    container.stop(timeout=0)
    containers.check(WorkerContext(settings))
    api.session_status(sid, "stopped")
    turn = api.finished_turn(api.chat(sid, "RUN: cat /workspace/k.txt")["id"])
    assert turn["status"] == "succeeded" and "kept" in turn["result"], turn
    assert container_of(docker_client, settings, sid).id == container.id
    api.call("DELETE", f"/api/v1/sessions/{sid}", 202)


def test_a_warm_start_is_much_faster_than_a_cold_one(stack_env, api, pool, docker_client):
    """POST /sessions → its `ready` event (its Redis id is stamped when published), from the pool and cold, 5 each."""
    warm, cold, sids = [], [], []
    for _ in range(5):
        for config, times in (({}, warm), (COLD, cold)):
            full_pool(pool, docker_client)  # so that no refill runs beside either start
            sent = time.time()
            sid = api.session(**config)["id"]
            sids.append(sid)
            api.session_status(sid, "ready")
            events = api.call("GET", f"/api/v1/sessions/{sid}/events", 200)["items"]
            ready = next(e for e in events if e["type"] == "session.status" and e["data"]["status"] == "ready")
            times.append(int(ready["id"].split("-")[0]) - sent * 1000)
    figures = {"warm_ms": [round(t) for t in warm], "cold_ms": [round(t) for t in cold],
               "warm_median_ms": round(statistics.median(warm)), "cold_median_ms": round(statistics.median(cold))}
    print(f"\nWARM POOL start -> ready: {figures}")
    assert statistics.median(warm) < statistics.median(cold) / 3, figures
    for sid in sids:
        api.call("DELETE", f"/api/v1/sessions/{sid}", 202)
