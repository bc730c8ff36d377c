"""Hot sessions end to end: one long-lived Claude Code per session, interrupts through its control protocol, and
tool approvals answered over the API — the real Claude Code in real containers, against the scripted model."""
from __future__ import annotations

import json
import threading
import time

import pytest
import requests
import websocket

from tests.conftest import wait_for
from tests.test_e2e import Api

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def api(stack_env, token):
    return Api(stack_env["base"], token("hot-owner"))


class Stream(threading.Thread):
    """A WebSocket client on a session's stream that keeps every frame, and can send commands."""

    def __init__(self, stack_env, token, sid: str) -> None:
        super().__init__(daemon=True)
        self.ws = websocket.create_connection(
            f"{stack_env['ws']}/api/v1/sessions/{sid}/stream?token={token('hot-owner')}", timeout=120)
        self.frames: list[dict] = []
        self.arrived: dict[int, float] = {}
        self.start()

    def run(self) -> None:
        try:
            while True:
                frame = json.loads(self.ws.recv())
                self.arrived[len(self.frames)] = time.monotonic()
                self.frames.append(frame)
        except Exception:
            pass

    def first(self, kind: str, turn_id: str | None = None, timeout: float = 60) -> dict:
        def seen():
            return next((f for f in list(self.frames) if f["type"] == kind
                         and (turn_id is None or f.get("turn_id") == turn_id)), None)
        return wait_for(seen, timeout, what=f"a {kind} event")

    def of_turn(self, turn_id: str) -> list[dict]:
        return [f for f in list(self.frames) if f.get("turn_id") == turn_id]

    def close(self) -> None:
        self.ws.close()


def container(docker_client, stack_env, sid: str):
    return docker_client.containers.get(f"{stack_env['settings'].key_prefix}-session-{sid}")


def claude_pids(docker_client, stack_env, sid: str) -> list[str]:
    """The long-lived Claude Code processes in the session's container (host pids)."""
    top = container(docker_client, stack_env, sid).top(ps_args="-eo pid,args")
    return [row[0] for row in top["Processes"] if "--input-format stream-json" in row[-1]]


def in_workspace(docker_client, stack_env, sid: str, path: str) -> bool:
    code, _ = container(docker_client, stack_env, sid).exec_run(["test", "-e", f"/workspace/{path}"], user="agent")
    return code == 0


def run_turn(api: Api, sid: str, prompt: str) -> dict:
    return api.finished_turn(api.chat(sid, prompt)["id"], timeout=90)


def test_three_turns_are_answered_by_one_hot_claude_code_that_sees_the_whole_conversation(api, stack_env,
                                                                                          docker_client):
    sid = api.session()["id"]
    pids = []
    for word in ("alpha", "bravo", "charlie"):
        turn = run_turn(api, sid, f"SAY: {word}")
        assert turn["status"] == "succeeded", turn
        assert turn["result"] == word
        pids.append(claude_pids(docker_client, stack_env, sid))
    assert len(pids[0]) == 1 and pids[0] == pids[1] == pids[2], pids
    asked = [r for r in stack_env["model"].tool_requests()
             if "SAY: charlie" in json.dumps(r["messages"][-1])][-1]
    text = json.dumps(asked["messages"])
    assert "SAY: alpha" in text and "SAY: bravo" in text  # the process kept the conversation


def test_a_cancel_interrupts_the_turn_through_claude_codes_control_protocol_and_the_process_stays(
        api, stack_env, docker_client):
    sid = api.session()["id"]
    assert run_turn(api, sid, "SAY: warm")["status"] == "succeeded"
    before = claude_pids(docker_client, stack_env, sid)
    turn = api.chat(sid, "SLOW: 30")
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{turn['id']}", 200)["status"] == "running", 30,
             what="the slow turn to run")
    time.sleep(1.0)  # well into its streaming
    asked = time.monotonic()
    api.call("POST", f"/api/v1/turns/{turn['id']}/cancel", 202)
    ended = api.finished_turn(turn["id"], timeout=30)
    took = time.monotonic() - asked
    assert ended["status"] == "cancelled" and ended["reason"] == "cancelled", ended
    assert took < 2.5, took  # the interrupt, not the signals' grace times
    assert claude_pids(docker_client, stack_env, sid) == before  # no signal: the same process
    after = run_turn(api, sid, "SAY: still here")
    assert after["status"] == "succeeded" and after["result"] == "still here"
    assert claude_pids(docker_client, stack_env, sid) == before


def test_a_claude_code_killed_in_its_container_fails_its_turn_as_process_lost_and_the_next_resumes(
        api, stack_env, docker_client):
    sid = api.session()["id"]
    assert run_turn(api, sid, "SAY: remember kilo")["status"] == "succeeded"
    turn = api.chat(sid, "SLOW: 30")
    wait_for(lambda: api.call("GET", f"/api/v1/turns/{turn['id']}", 200)["status"] == "running", 30,
             what="the slow turn to run")
    time.sleep(1.0)
    box = container(docker_client, stack_env, sid)
    code, out = box.exec_run(["sh", "-c", "pkill -KILL -f '^claude -p --input-format'"], user="agent")
    assert code == 0, out
    ended = api.finished_turn(turn["id"], timeout=30)
    assert ended["status"] == "failed" and ended["reason"] == "process_lost", ended
    next_turn = run_turn(api, sid, "SAY: back")
    assert next_turn["status"] == "succeeded", next_turn
    asked = [r for r in stack_env["model"].tool_requests() if "SAY: back" in json.dumps(r["messages"][-1])][-1]
    assert "remember kilo" in json.dumps(asked["messages"])  # resumed in the new process


@pytest.fixture(scope="module")
def asking(api, stack_env, token):
    """A session whose permission prompts come to the API, with a stream on it."""
    sid = api.session(approvals="ask", approval_timeout_seconds=4)["id"]
    stream = Stream(stack_env, token, sid)
    yield sid, stream
    stream.close()


def answer(api: Api, turn_id: str, request_id: str, expect: int = 200, **body) -> dict:
    return api.call("POST", f"/api/v1/turns/{turn_id}/approvals/{request_id}", expect, json=body)


def test_a_denied_tool_never_runs_and_the_model_gets_the_denial(api, stack_env, docker_client, asking):
    sid, stream = asking
    turn = api.chat(sid, "RUN: touch /workspace/denied")
    asked = stream.first("approval.requested", turn["id"])
    assert asked["data"]["tool_name"] == "Bash"
    assert asked["data"]["input"]["command"] == "touch /workspace/denied"
    assert asked["data"]["deadline"]
    shown = api.call("GET", f"/api/v1/turns/{turn['id']}", 200)
    assert [a["request_id"] for a in shown["pending_approvals"]] == [asked["data"]["request_id"]]
    answer(api, turn["id"], asked["data"]["request_id"], behavior="deny", message="not today, agent")
    ended = api.finished_turn(turn["id"])
    assert ended["status"] == "succeeded", ended
    assert not in_workspace(docker_client, stack_env, sid, "denied")
    last = stack_env["model"].tool_requests()[-1]
    assert "not today, agent" in json.dumps(last["messages"][-1])
    resolved = stream.first("approval.resolved", turn["id"])
    assert resolved["data"]["status"] == "denied" and resolved["data"]["decided_by"] == "hot-owner"
    # Answering twice is a conflict; an unknown prompt is missing.
    again = answer(api, turn["id"], asked["data"]["request_id"], 409, behavior="allow")
    assert again["error"]["code"] == "approval_resolved"
    answer(api, turn["id"], "no-such-request", 404, behavior="allow")


def test_an_allow_with_an_edited_command_runs_the_edited_command(api, stack_env, docker_client, asking):
    sid, stream = asking
    turn = api.chat(sid, "RUN: touch /workspace/as-asked")
    asked = stream.first("approval.requested", turn["id"])
    edited = {**asked["data"]["input"], "command": "touch /workspace/as-edited"}
    answer(api, turn["id"], asked["data"]["request_id"], behavior="allow", updated_input=edited)
    assert api.finished_turn(turn["id"])["status"] == "succeeded"
    assert in_workspace(docker_client, stack_env, sid, "as-edited")
    assert not in_workspace(docker_client, stack_env, sid, "as-asked")


def test_a_prompt_nobody_answers_is_denied_at_its_deadline_and_the_wait_does_not_count_against_the_turn(
        api, stack_env, docker_client, asking):
    sid, stream = asking
    turn = api.chat(sid, "RUN: touch /workspace/late")
    stream.first("approval.requested", turn["id"])
    ended = api.finished_turn(turn["id"])
    assert ended["status"] == "succeeded", ended
    resolved = stream.first("approval.resolved", turn["id"])
    assert resolved["data"]["status"] == "timed_out"
    assert not in_workspace(docker_client, stack_env, sid, "late")
    listed = api.call("GET", f"/api/v1/turns/{turn['id']}/approvals", 200)["approvals"]
    assert [a["status"] for a in listed] == ["timed_out"]


def test_a_remembered_allow_stops_the_next_identical_prompt_and_a_websocket_answer_works(
        api, stack_env, docker_client, asking):
    sid, stream = asking
    turn = api.chat(sid, "RUN: touch /workspace/again")
    asked = stream.first("approval.requested", turn["id"])
    stream.ws.send(json.dumps({"type": "approve", "id": "a1", "turn_id": turn["id"],
                               "request_id": asked["data"]["request_id"], "behavior": "allow", "remember": True}))
    reply = wait_for(lambda: next((f for f in list(stream.frames) if f.get("type") == "reply"
                                   and f.get("id") == "a1"), None), 30, what="the approve command's reply")
    assert reply["ok"], reply
    assert api.finished_turn(turn["id"])["status"] == "succeeded"
    assert in_workspace(docker_client, stack_env, sid, "again")
    resolved = stream.first("approval.resolved", turn["id"])
    assert resolved["data"]["via"] == "websocket" and resolved["data"]["remember"] is True
    second = api.chat(sid, "RUN: touch /workspace/again")
    assert api.finished_turn(second["id"])["status"] == "succeeded"
    assert not [f for f in stream.of_turn(second["id"]) if f["type"] == "approval.requested"]


def test_the_spawn_tools_server_runs_once_per_process_and_its_renewed_token_works_in_every_turn(
        api, stack_env, docker_client):
    sid = api.session()["id"]
    servers = []
    for _ in range(2):
        turn = run_turn(api, sid, "CALL: mcp__ccd__list_children {}")
        assert turn["status"] == "succeeded" and turn["result"].startswith("TOOL-RESULT:"), turn
        assert "error" not in turn["result"].lower(), turn["result"]
        top = container(docker_client, stack_env, sid).top(ps_args="-eo pid,args")
        servers.append([row[0] for row in top["Processes"] if "wrapper mcp" in row[-1]])
    assert len(servers[0]) == 1 and servers[0] == servers[1], servers
    box = container(docker_client, stack_env, sid)
    code, mode = box.exec_run(["stat", "-c", "%a", "/home/agent/.ccd/turns/session-token"], user="agent")
    assert code == 0 and mode.strip() == b"600", mode
