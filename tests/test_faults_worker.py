"""Faults on the worker side, injected for real: a worker SIGKILLed mid-turn (re-attach, or
worker_lost when none comes back), a task delivered twice, a container killed mid-turn, output
floods, and a turn past its timeout.

A private stack (own database, key prefix and queues; the run's image, network and model server)
with short leases, so a lost worker is noticed in seconds rather than minutes.
"""
from __future__ import annotations

import json
import secrets
import time
import uuid
from dataclasses import replace

import pytest

from core.migrate import prepare_database
from core.queues import TaskSender
from tests import stack
from tests.conftest import wait_for
from tests.figures import report
from tests.test_e2e import Api

pytestmark = pytest.mark.docker
LEASE, LOST, REAP = 3, 8, 1
MAX_EVENT, MAX_OUTPUT = 4096, 60_000


@pytest.fixture(scope="module")
def faulty(stack_env, settings, docker_client, token):
    """web, worker and beat of a private stack; the test may kill and restart the worker."""
    suffix = secrets.token_hex(2)
    database_url = settings.database_url.rsplit("/", 1)[0] + f"/{settings.database_url.rsplit('/', 1)[1]}_w{suffix}"
    prepare_database(database_url)
    prefix = f"{settings.key_prefix}w{suffix}"
    port = stack.free_port()
    env = {**stack_env["env"], "DATABASE_URL": database_url, "CCD_KEY_PREFIX": prefix, "CCD_PORT": str(port),
           "CCD_LEASE_SECONDS": str(LEASE), "CCD_WORKER_LOST_SECONDS": str(LOST), "CCD_REAP_SECONDS": str(REAP),
           # Redis hands an unacknowledged task out again after 4 s: long turns are delivered twice.
           "CCD_VISIBILITY_TIMEOUT_SECONDS": "4",
           "CCD_MAX_EVENT_BYTES": str(MAX_EVENT), "CCD_MAX_TURN_OUTPUT_BYTES": str(MAX_OUTPUT),
           "CCD_SESSION_API_URL": "", "CCD_MODEL_PROXY_PORT": str(stack.free_port())}
    proxy = stack.start_proxy(env, name="faults-proxy")  # it checks sessions in this stack's database
    web = stack.start_web(env, port, name="faults-web")
    beat = stack.start_beat(env, name="faults-beat")
    state = {"env": env, "worker": stack.start_worker(env, name="faults-worker"), "prefix": prefix,
             "api": Api(f"http://127.0.0.1:{port}", token("faults")), "model": stack_env["model"],
             "settings": replace(settings, database_url=database_url, key_prefix=prefix)}
    yield state
    state["worker"].stop()
    beat.stop()
    web.stop()
    proxy.stop()
    stack.remove_private_stack(docker_client, prefix, database_url)


def ready_session(api: Api, **config) -> str:
    sid = api.session(**config)["id"]
    api.session_status(sid, "ready")
    return sid


def turn_events(api: Api, sid: str, turn_id: str) -> list[dict]:
    """Every stored event of one turn, in stream order."""
    events, since = [], None
    while True:
        page = api.call("GET", f"/api/v1/sessions/{sid}/events", 200,
                        params={"limit": 1000, **({"since": since} if since else {})})
        events += page["items"]
        if not page["has_more"]:
            break
        since = page["next_since"]
    return [e for e in events if e.get("turn_id") == turn_id]


def turn_log(docker_client, prefix: str, sid: str, turn_id: str) -> list[dict]:
    """The Claude Code lines of a turn as the wrapper logged them in its container."""
    container = docker_client.containers.get(f"{prefix}-session-{sid}")
    code, out = container.exec_run(["cat", f"/home/agent/.ccd/turns/{turn_id}.log"], user="agent")
    assert code == 0, out
    records = [line.split("\t", 1) for line in out.decode().splitlines()]
    return [json.loads(text) for tag, text in records if tag != "exit"]


def wait_for_events(api: Api, sid: str, turn_id: str, kind: str, count: int) -> None:
    wait_for(lambda: sum(e["type"] == kind for e in turn_events(api, sid, turn_id)) >= count, 60,
             what=f"{count} {kind} events")


def prompts_sent(model, prompt: str) -> int:
    """How many times the agent asked the model to answer `prompt` (once per turn run)."""
    def first_user_text(body: dict) -> str:
        users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
        content = users[-1]["content"] if users else ""
        return content if isinstance(content, str) else " ".join(b.get("text", "") for b in content)
    return sum(prompt in first_user_text(body) for body in model.tool_requests())


def test_worker_killed_mid_stream_is_replaced_and_the_turn_completes_with_every_event_once(faulty, docker_client):
    api = faulty["api"]
    sid = ready_session(api)
    prompt = f"run {secrets.token_hex(4)}\nSLOW: 8"
    turn_id = api.chat(sid, prompt)["id"]
    wait_for_events(api, sid, turn_id, "claude.stream_event", 5)

    faulty["worker"].kill()
    try:
        before = len(turn_events(api, sid, turn_id))
        time.sleep(LEASE)  # the agent keeps streaming while no worker reads it
    finally:
        faulty["worker"] = stack.start_worker(faulty["env"], name="faults-worker")

    turn = api.finished_turn(turn_id, timeout=90)
    assert turn["status"] == "succeeded", turn["error"]
    assert turn["attempt"] == 2 and "SLOW-DONE" in turn["result"]
    events = turn_events(api, sid, turn_id)
    published = [e["data"] for e in events if e["type"].startswith("claude.")]
    logged = turn_log(docker_client, faulty["prefix"], sid, turn_id)
    report("worker_sigkill_reattach", {"faults": 1, "events_before_kill": before, "lines_logged": len(logged),
                                       "lines_published": len(published),
                                       "lost": sum(line not in published for line in logged),
                                       "duplicates": len(published) - len({json.dumps(p) for p in published}),
                                       "model_requests_for_prompt": prompts_sent(faulty["model"], prompt)})
    assert len(logged) > before and published == logged, "the stream must hold every line of the turn once, in order"
    kinds = [e["type"] for e in events]
    assert kinds.count("turn.started") == 1 and kinds.count("turn.completed") == 1 and kinds[-1] == "turn.completed"
    assert prompts_sent(faulty["model"], prompt) == 1, "the turn ran twice"
    assert "re-attaching" in faulty["worker"].log_path.read_text()


def test_a_task_delivered_twice_runs_its_turn_once(faulty):
    api = faulty["api"]
    sid = ready_session(api)
    prompt = f"run {secrets.token_hex(4)}\nSLOW: 10"
    turn_id = api.chat(sid, prompt)["id"]
    turn = api.finished_turn(turn_id, timeout=90)
    assert turn["status"] == "succeeded" and turn["attempt"] == 1, turn
    duplicates = faulty["worker"].log_path.read_text().count(f"turn {turn_id} is already running")
    report("task_redelivered", {"deliveries": duplicates + 1, "runs": prompts_sent(faulty["model"], prompt),
                                "attempt": turn["attempt"]})
    assert duplicates >= 1, "the broker did not deliver the turn's task again; the test proves nothing"
    assert [e["type"] for e in turn_events(api, sid, turn_id)].count("turn.started") == 1
    assert prompts_sent(faulty["model"], prompt) == 1


def test_a_late_copy_of_a_start_task_leaves_a_ready_session_running_and_a_deleted_one_without_a_container(
        faulty, docker_client):
    """A start task carries what to make, so the worker makes the container before it reads the session: a copy
    that comes after the session was started, or deleted, must undo only what it did itself."""
    api, worker, prefix = faulty["api"], faulty["worker"], faulty["prefix"]
    sender, spec = TaskSender(faulty["settings"]), {"owner": "faults", "config": {}, "persistent": False}
    ready, deleted = ready_session(api), ready_session(api)
    running = docker_client.containers.get(f"{prefix}-session-{ready}")
    api.call("DELETE", f"/api/v1/sessions/{deleted}", 202)
    api.session_status(deleted, "deleted")
    assert not docker_client.containers.list(all=True, filters={"name": f"{prefix}-session-{deleted}"})

    sender.start_session(ready, spec)
    sender.start_session(deleted, spec)
    for sid, status in ((ready, "ready"), (deleted, "deleted")):
        wait_for(lambda sid=sid, status=status: f"session {sid} is {status}, not being made"
                 in worker.log_path.read_text(), 60, what=f"the late start of the {status} session to be dropped")

    running.reload()
    assert running.status == "running" and api.call("GET", f"/api/v1/sessions/{ready}", 200)["status"] == "ready"
    assert api.finished_turn(api.chat(ready, "SAY: still here")["id"])["status"] == "succeeded"
    assert not docker_client.containers.list(all=True, filters={"name": f"{prefix}-session-{deleted}"})
    assert not [v for v in docker_client.volumes.list(filters={"name": f"{prefix}-{deleted}"})]


def test_worker_lost_for_good_fails_the_turn_and_the_session_takes_turns_again(faulty):
    api = faulty["api"]
    sid = ready_session(api)
    turn_id = api.chat(sid, "SLOW: 30")["id"]
    wait_for_events(api, sid, turn_id, "claude.stream_event", 2)
    faulty["worker"].kill()
    killed_at = time.monotonic()
    # The service goes on elsewhere: a worker of another host (it runs the reaper), none of this one.
    other = stack.start_worker({**faulty["env"], "CCD_HOST_NAME": "other-host"}, name="faults-other-worker")
    try:
        turn = api.finished_turn(turn_id, timeout=LEASE + LOST + 30)
        waited = time.monotonic() - killed_at
    finally:
        other.stop()
        faulty["worker"] = stack.start_worker(faulty["env"], name="faults-worker")
    bound = LEASE + LOST + 4 * REAP + 5
    report("worker_lost", {"faults": 1, "seconds_to_worker_lost": round(waited, 1), "bound_seconds": bound,
                           "lease_seconds": LEASE, "worker_lost_seconds": LOST})
    assert turn["status"] == "failed" and turn["reason"] == "worker_lost", turn
    assert waited < bound, f"worker_lost took {waited:.0f}s, more than {bound}s"
    final = [e for e in turn_events(api, sid, turn_id) if e["type"] == "turn.failed"]
    assert len(final) == 1 and final[0]["data"]["reason"] == "worker_lost"

    after = api.finished_turn(api.chat(sid, "SAY: back again")["id"])
    assert after["status"] == "succeeded" and after["result"] == "back again", after["error"]


def test_container_killed_mid_turn_fails_the_turn_with_the_reason_and_the_next_turn_works(faulty, docker_client):
    api = faulty["api"]
    sid = ready_session(api)
    turn_id = api.chat(sid, "SLOW: 20")["id"]
    wait_for_events(api, sid, turn_id, "claude.stream_event", 2)
    docker_client.containers.get(f"{faulty['prefix']}-session-{sid}").kill()
    turn = api.finished_turn(turn_id)
    assert turn["status"] == "failed" and turn["reason"] == "container_lost", (turn["result"], turn["error"])
    assert "stopped during the turn" in turn["error"]
    nxt = api.finished_turn(api.chat(sid, "SAY: recovered")["id"])
    assert nxt["status"] == "succeeded" and nxt["result"] == "recovered", (nxt["error"], nxt["reason"])


def test_an_oversized_line_is_truncated_with_a_marker_and_the_turn_still_succeeds(faulty):
    api = faulty["api"]
    sid = ready_session(api)
    turn_id = api.chat(sid, "RUN: python3 -c \"print('ab' * 3000)\"")["id"]
    turn = api.finished_turn(turn_id)
    assert turn["status"] == "succeeded", turn["error"]
    events = turn_events(api, sid, turn_id)
    marked = [e for e in events if "ccd_truncated" in e["data"]]
    assert marked and all(e["data"]["ccd_truncated"]["original_bytes"] > MAX_EVENT for e in marked)
    assert all(len(json.dumps(e["data"])) < MAX_EVENT for e in events), "an event passed the size limit"
    assert "ab" * 3000 in turn["result"], "the turn row keeps the whole answer"


def test_output_past_the_turn_limit_ends_the_turn_failed_output_limit(faulty, docker_client):
    api = faulty["api"]
    sid = ready_session(api)
    turn_id = api.chat(sid, "SLOW: 120")["id"]  # about 500 streamed lines: far past the limit
    turn = api.finished_turn(turn_id, timeout=60)
    assert turn["status"] == "failed" and turn["reason"] == "output_limit", turn
    published = sum(len(json.dumps(e["data"], separators=(",", ":"))) for e in turn_events(api, sid, turn_id) if e["type"].startswith("claude."))
    assert published <= MAX_OUTPUT
    assert_turn_stopped(api, docker_client, faulty["prefix"], sid)


def assert_turn_stopped(api, docker_client, prefix: str, sid: str) -> None:
    """The stopped turn no longer runs: at most the session's one (hot, now idle) Claude Code is left, and the next
    turn gets it at once."""
    container = docker_client.containers.get(f"{prefix}-session-{sid}")
    names = container.exec_run(["ps", "-eo", "comm"]).output.split()
    assert names.count(b"claude") <= 1, names
    started = time.monotonic()
    after = api.finished_turn(api.chat(sid, "SAY: free again")["id"], timeout=30)
    assert (after["status"], after["result"]) == ("succeeded", "free again"), after
    assert time.monotonic() - started < 10


def test_a_turn_past_its_timeout_ends_timed_out_and_the_session_takes_the_next_turn_at_once(faulty, docker_client):
    api = faulty["api"]
    sid = ready_session(api, timeouts={"turn_seconds": 3})
    started = time.monotonic()
    turn = api.finished_turn(api.chat(sid, "SLOW: 60")["id"], timeout=60)
    assert turn["status"] == "timed_out" and turn["reason"] == "timeout", turn
    assert time.monotonic() - started < 30
    assert_turn_stopped(api, docker_client, faulty["prefix"], sid)


def test_left_over_containers_are_removed_and_a_vanished_container_is_marked_and_restarted(faulty, docker_client):
    api = faulty["api"]
    settings = faulty["settings"]
    stray = docker_client.containers.create(settings.image, ["sleep", "infinity"], labels={
        "ccd.prefix": faulty["prefix"], "ccd.session": str(uuid.uuid4())})
    sid = ready_session(api)
    docker_client.containers.get(f"{faulty['prefix']}-session-{sid}").remove(force=True)

    api.session_status(sid, "stopped", timeout=30)
    wait_for(lambda: not docker_client.containers.list(all=True, filters={"id": stray.id}), 30,
             what="the left-over container to be removed")
    statuses = [e["data"] for e in api.call("GET", f"/api/v1/sessions/{sid}/events", 200)["items"]
                if e["type"] == "session.status"]
    assert {"status": "stopped", "reason": "container_lost"} in statuses
    turn = api.finished_turn(api.chat(sid, "SAY: rebuilt")["id"])
    assert turn["status"] == "succeeded" and turn["result"] == "rebuilt", turn["error"]


@pytest.mark.engine_restart
def test_docker_engine_restart_marks_sessions_and_they_restart_on_their_next_turn(faulty, docker_client):
    api = faulty["api"]
    sid = ready_session(api)
    assert api.finished_turn(api.chat(sid, "SAY: before")["id"])["status"] == "succeeded"

    stack.restart_dockerd()

    api.session_status(sid, "stopped", timeout=60)
    turn = api.finished_turn(api.chat(sid, "SAY: after the restart")["id"])
    assert turn["status"] == "succeeded" and turn["result"] == "after the restart", turn["error"]
    events = api.call("GET", f"/api/v1/sessions/{sid}/events", 200, params={"limit": 1000})["items"]
    assert [e["data"].get("reason") for e in events if e["data"].get("status") == "stopped"] == ["container_lost"]
