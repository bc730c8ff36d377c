"""Hot sessions under faults, injected for real: the worker SIGKILLed while a turn waits for an approval, and a
host that keeps one idle hot process (CCD_MAX_HOT_PER_HOST=1) while two sessions take turns."""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import replace

import pytest

from core.migrate import prepare_database
from tests import stack
from tests.conftest import wait_for
from tests.test_e2e import Api
from tests.test_faults_worker import LEASE, LOST, REAP, turn_events, turn_log
from tests.test_hot_e2e import claude_pids

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def hot(stack_env, settings, docker_client, token):
    """web, worker and beat of a private stack with short leases and one idle hot process per host."""
    suffix = secrets.token_hex(2)
    database_url = settings.database_url.rsplit("/", 1)[0] + f"/{settings.database_url.rsplit('/', 1)[1]}_h{suffix}"
    prepare_database(database_url)
    prefix = f"{settings.key_prefix}h{suffix}"
    port = stack.free_port()
    env = {**stack_env["env"], "DATABASE_URL": database_url, "CCD_KEY_PREFIX": prefix, "CCD_PORT": str(port),
           "CCD_LEASE_SECONDS": str(LEASE), "CCD_WORKER_LOST_SECONDS": str(LOST), "CCD_REAP_SECONDS": str(REAP),
           "CCD_MAX_HOT_PER_HOST": "1", "CCD_SESSION_API_URL": "", "CCD_MODEL_PROXY_PORT": str(stack.free_port())}
    proxy = stack.start_proxy(env, name="hot-proxy")
    web = stack.start_web(env, port, name="hot-web")
    beat = stack.start_beat(env, name="hot-beat")
    state = {"env": env, "worker": stack.start_worker(env, name="hot-worker"), "prefix": prefix,
             "api": Api(f"http://127.0.0.1:{port}", token("hot-faults")), "model": stack_env["model"],
             "stack_env": {**stack_env, "settings": replace(settings, key_prefix=prefix)}}
    yield state
    state["worker"].stop()
    beat.stop()
    web.stop()
    proxy.stop()
    stack.remove_private_stack(docker_client, prefix, database_url)


def test_an_approval_answered_after_its_worker_was_killed_reaches_claude_code_and_no_event_is_lost(
        hot, docker_client):
    api = hot["api"]
    sid = api.session(approvals="ask")["id"]
    api.session_status(sid, "ready")
    turn_id = api.chat(sid, "RUN: touch /workspace/after-takeover")["id"]
    asked = wait_for(lambda: next((e for e in turn_events(api, sid, turn_id) if e["type"] == "approval.requested"),
                                  None), 60, what="the approval request")
    hot["worker"].kill()
    try:
        time.sleep(LEASE + 1)  # the prompt waits in the container's turn agent while no worker holds the turn
    finally:
        hot["worker"] = stack.start_worker(hot["env"], name="hot-worker")
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{turn_id}", 200)["attempt"] >= 2, 60,
             what="a new worker to take the turn over")
    api.call("POST", f"/api/v1/turns/{turn_id}/approvals/{asked['data']['request_id']}", 200,
             json={"behavior": "allow"})
    turn = api.finished_turn(turn_id, timeout=60)
    assert turn["status"] == "succeeded", turn
    box = docker_client.containers.get(f"{hot['prefix']}-session-{sid}")
    assert box.exec_run(["test", "-e", "/workspace/after-takeover"], user="agent")[0] == 0
    events = turn_events(api, sid, turn_id)
    published = [e["data"] for e in events if e["type"].startswith("claude.")]
    logged = [line for line in turn_log(docker_client, hot["prefix"], sid, turn_id)
              if line.get("type") not in ("control_request", "control_cancel_request")]
    assert published == logged, "every line of the turn once, in order"
    kinds = [e["type"] for e in events]
    assert kinds.count("approval.requested") == 1 and kinds.count("approval.resolved") == 1
    assert kinds.count("turn.started") == 1 and kinds[-1] == "turn.completed"


def test_two_sessions_alternating_on_a_host_that_keeps_one_hot_process_get_every_turn_right(hot, docker_client):
    api, model = hot["api"], hot["model"]
    sessions = [api.session()["id"] for _ in range(2)]
    for sid in sessions:
        api.session_status(sid, "ready")
    words = {sid: [] for sid in sessions}
    for round_ in range(3):
        for sid in sessions:
            word = f"w{round_}-{secrets.token_hex(3)}"
            turn = api.finished_turn(api.chat(sid, f"SAY: {word}")["id"], timeout=90)
            assert turn["status"] == "succeeded" and turn["result"] == word, turn
            words[sid].append(word)
            asked = [r for r in model.tool_requests() if f"SAY: {word}" in json.dumps(r["messages"])][-1]
            seen = json.dumps(asked["messages"])
            assert all(f"SAY: {w}" in seen for w in words[sid])  # its own conversation, whole
            other = next(s for s in sessions if s != sid)
            assert not any(f"SAY: {w}" in seen for w in words[other])  # and only its own
    # The host keeps one idle hot process: after the last turn, the other session's has been ended.
    wait_for(lambda: [len(claude_pids(docker_client, hot["stack_env"], sid)) for sid in sessions] == [0, 1], 20,
             what="the least recently used hot process to end")
