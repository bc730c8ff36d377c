"""Resource exhaustion through the API, against a real gunicorn web with small ceilings and quotas: a session
asking for more than a ceiling is a 422 naming the field and the ceiling; an owner past the aggregate memory or
CPU quota of its live sessions, or past its pending batch items, gets a 429 with Retry-After; creates racing for
the last room cannot both take it. No worker runs: sessions stay `creating`, which counts as live."""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import create_engine, text

from tests.test_limits import Api, error_of, limited_web

CEILINGS = {"CCD_MAX_MEMORY_MB": 4096, "CCD_MAX_CPUS": 2, "CCD_MAX_PIDS": 1024, "CONTAINER_TIMEOUT_DEFAULT": 300,
            "CCD_MAX_TURN_SECONDS": 600, "CCD_MAX_IDLE_SECONDS": 1200}
QUOTAS = {"CCD_OWNER_MAX_SESSIONS": 10, "CCD_OWNER_MAX_MEMORY_MB": 6144, "CCD_OWNER_MAX_CPUS": 3,
          "CCD_OWNER_MAX_PENDING_ITEMS": 5}


@pytest.fixture(scope="module")
def server(api_settings, tmp_path_factory):
    """gunicorn (two processes, so requests really run at once) with the small CEILINGS and QUOTAS."""
    host, web = limited_web(api_settings, tmp_path_factory.mktemp("quotas-storage"), {**CEILINGS, **QUOTAS},
                            "web-quotas", processes=2)
    yield host
    web.stop()


@pytest.fixture
def api(server, api_settings):
    return Api(server, api_settings.jwt_secret, f"quotas-{uuid.uuid4().hex[:8]}")


def create(api: Api, **config):
    return api("POST", "/sessions", json={"config": config})


@pytest.mark.parametrize("config, field, setting", [
    ({"limits": {"memory_mb": 4097}}, "config.limits.memory_mb", "CCD_MAX_MEMORY_MB"),
    ({"limits": {"cpus": 2.5}}, "config.limits.cpus", "CCD_MAX_CPUS"),
    ({"limits": {"pids": 1025}}, "config.limits.pids", "CCD_MAX_PIDS"),
    ({"timeouts": {"turn_seconds": 601}}, "config.timeouts.turn_seconds", "CCD_MAX_TURN_SECONDS"),
    ({"timeouts": {"idle_seconds": 1201}}, "config.timeouts.idle_seconds", "CCD_MAX_IDLE_SECONDS"),
])
def test_a_session_asking_above_a_ceiling_is_a_422_naming_the_field_and_the_ceiling(api, config, field, setting):
    err = error_of(create(api, **config), 422, "limit_exceeded")
    assert err["field"] == field and err["limit"] == CEILINGS[setting], err
    assert setting in err["message"] and str(CEILINGS[setting]) in err["message"], err
    assert api("GET", "/sessions").json()["total"] == 0  # nothing was made
    # At the ceiling itself the same request is taken.
    group, values = next(iter(config.items()))
    key = next(iter(values))
    at = {group: {key: CEILINGS[setting]}}
    resp = create(api, **at)
    assert resp.status_code == 201, resp.text
    assert resp.json()["config"][group][key] == CEILINGS[setting]


def test_a_child_asking_above_a_ceiling_is_refused_on_spawn(api):
    parent = api.session()
    err = error_of(api("POST", f"/sessions/{parent}/spawn", json={"config": {"limits": {"cpus": 64}}}),
                   422, "limit_exceeded")
    assert err["field"] == "config.limits.cpus" and err["limit"] == CEILINGS["CCD_MAX_CPUS"], err
    assert api("GET", f"/sessions/{parent}/children").json()["items"] == []


def test_a_batch_item_asking_above_a_ceiling_rejects_the_batch_naming_the_item(api):
    items = [{"prompt": "fine", "config": {}}, {"prompt": "greedy", "config": {"limits": {"pids": 32768}}}]
    err = error_of(api("POST", "/batches", json={"items": items}), 422, "limit_exceeded")
    assert err["field"] == "items[1].config.limits.pids" and err["limit"] == CEILINGS["CCD_MAX_PIDS"], err
    assert api("GET", "/batches").json()["total"] == 0
    assert api("GET", "/sessions").json()["total"] == 0


def test_an_owner_over_its_memory_quota_gets_a_429_with_retry_after(api, server, api_settings):
    assert create(api, limits={"memory_mb": 4096}).status_code == 201
    assert create(api, limits={"memory_mb": 2048}).status_code == 201  # 6144 MB: the quota, exactly
    resp = create(api, limits={"memory_mb": 128, "cpus": 0.1})
    err = error_of(resp, 429, "memory_quota")
    assert err["limit"] == QUOTAS["CCD_OWNER_MAX_MEMORY_MB"] and int(resp.headers["Retry-After"]) > 0, err
    assert api("GET", "/sessions").json()["total"] == 2
    # A spawn is a session too; another owner has a quota of its own.
    parent = api("GET", "/sessions").json()["items"][0]["id"]
    error_of(api("POST", f"/sessions/{parent}/spawn", json={}), 429, "memory_quota")
    other = Api(server, api_settings.jwt_secret, f"quotas-{uuid.uuid4().hex[:8]}")
    assert create(other, limits={"memory_mb": 4096}).status_code == 201


def test_an_owner_over_its_cpu_quota_gets_a_429_with_retry_after(api):
    assert create(api, limits={"cpus": 2, "memory_mb": 128}).status_code == 201
    assert create(api, limits={"cpus": 0.5, "memory_mb": 128}).status_code == 201
    assert create(api, limits={"cpus": 0.5, "memory_mb": 128}).status_code == 201  # 3 CPUs: the quota
    resp = create(api, limits={"cpus": 0.1, "memory_mb": 128})
    err = error_of(resp, 429, "cpu_quota")
    assert err["limit"] == QUOTAS["CCD_OWNER_MAX_CPUS"] and int(resp.headers["Retry-After"]) > 0, err


def test_creates_racing_for_the_last_room_cannot_both_take_it(api):
    # Room for three 2048 MB sessions; twelve ask at once, across both web processes.
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: create(api, limits={"memory_mb": 2048, "cpus": 0.1}), range(12)))
    codes = sorted(resp.status_code for resp in answers)
    assert codes == [201] * 3 + [429] * 9, [r.text[:200] for r in answers]
    assert all(r.json()["error"]["code"] == "memory_quota" for r in answers if r.status_code == 429)
    assert api("GET", "/sessions").json()["total"] == 3


def stopped_session(api: Api, api_settings, **config) -> str:
    """A session in `stopped`, as a worker leaves it once its container has stopped (no worker runs here)."""
    sid = create(api, **config).json()["id"]
    engine = create_engine(api_settings.database_url)
    with engine.begin() as conn:
        conn.execute(text("UPDATE sessions SET status = 'stopped' WHERE id = :id"), {"id": sid})
    engine.dispose()
    return sid


def test_a_stopped_session_cannot_restart_past_the_quota(api, api_settings):
    stopped = stopped_session(api, api_settings, limits={"memory_mb": 4096})
    assert create(api, limits={"memory_mb": 4096}).status_code == 201  # the stopped one holds nothing
    resp = api("POST", f"/sessions/{stopped}/chat", json={"prompt": "wake up"})
    err = error_of(resp, 429, "memory_quota")
    assert int(resp.headers["Retry-After"]) > 0, err
    assert api("GET", f"/sessions/{stopped}/turns").json()["total"] == 0  # nothing was queued


def test_a_file_request_cannot_restart_a_stopped_session_past_the_quota(api, api_settings):
    stopped = stopped_session(api, api_settings, limits={"memory_mb": 4096})
    engine = create_engine(api_settings.database_url)
    with engine.begin() as conn:  # placed on a host, as a session that ran is (no worker serves that queue here)
        conn.execute(text("UPDATE sessions SET host_queue = 'nowhere' WHERE id = :id"), {"id": stopped})
    engine.dispose()
    assert create(api, limits={"memory_mb": 4096}).status_code == 201
    resp = api("GET", f"/sessions/{stopped}/workspace/files/notes.txt")
    error_of(resp, 429, "memory_quota")  # refused before any worker is asked to start it
    assert api("GET", f"/sessions/{stopped}").json()["status"] == "stopped"


def test_a_batch_item_for_a_stopped_session_waits_while_its_restart_would_pass_the_quota(api, api_settings):
    stopped = stopped_session(api, api_settings, limits={"memory_mb": 4096})
    assert create(api, limits={"memory_mb": 4096}).status_code == 201
    resp = api("POST", "/batches", json={"items": [{"prompt": "wake up", "session_id": stopped}]})
    assert resp.status_code == 202, resp.text
    assert resp.json()["counts"]["pending"] == 1, resp.json()  # not refused: it waits for room
    assert api("GET", f"/sessions/{stopped}").json()["status"] == "stopped"


def test_an_owner_over_its_pending_batch_items_gets_a_429(api):
    sid = api.session()
    # Concurrency 1: one item is released as a turn, the rest wait as pending.
    first = api("POST", "/batches", json={"concurrency": 1, "items": [{"prompt": f"p{i}", "session_id": sid}
                                                                     for i in range(4)]})
    assert first.status_code == 202, first.text
    pending = first.json()["counts"]["pending"]
    assert pending >= 3, first.json()
    room = QUOTAS["CCD_OWNER_MAX_PENDING_ITEMS"] - pending
    over = [{"prompt": "more", "session_id": sid}] * (room + 1)
    resp = api("POST", "/batches", json={"concurrency": 1, "items": over})
    err = error_of(resp, 429, "pending_items_limit")
    assert err["limit"] == QUOTAS["CCD_OWNER_MAX_PENDING_ITEMS"] and int(resp.headers["Retry-After"]) > 0, err
    assert api("GET", "/batches").json()["total"] == 1  # the refused batch stored nothing
    if room:
        fits = api("POST", "/batches", json={"concurrency": 1, "items": over[:room]})
        assert fits.status_code == 202, fits.text


def test_the_worker_keeps_a_session_accepted_before_a_ceiling_was_lowered_under_it(api_settings):
    from dataclasses import replace

    from core.limits import session_limits
    from workers.turn_runner import turn_timeout

    lowered = replace(api_settings, max_memory_mb=3000, max_cpus=1.5, max_pids=600, container_timeout_default=300,
                      max_turn_seconds=900)
    old = {"limits": {"memory_mb": 8192, "cpus": 4.0, "pids": 2048}, "timeouts": {"turn_seconds": 5000}}
    assert session_limits(old, lowered) == {"memory_mb": 3000, "cpus": 1.5, "pids": 600}
    assert session_limits({}, lowered) == {"memory_mb": 2048, "cpus": 1.0, "pids": 512}
    assert turn_timeout(old, lowered) == 900 and turn_timeout({}, lowered) == 300
