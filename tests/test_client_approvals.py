"""Tool approvals from the client side against the real stack: the Python client's approvals and
answer_approval with the server's error codes, `ccd approve` and `ccd approvals`, and `ccd chat` asking
on a terminal (a pseudo-terminal) or, without one, printing how to answer. The approvals are opened on a
real running turn as the worker opens them (tests/approval_requests.py)."""
from __future__ import annotations

import os
import pty
import subprocess
import sys
import threading
import time
import uuid

import pytest

from client.api import Client, Conflict, NotFound, ValidationError
from tests.approval_requests import Approvals
from tests.conftest import wait_for
from tests.test_client import ROOT, ccd, client_for

pytestmark = pytest.mark.docker
OWNER = "client-approvals"
# Long enough for every step of a test; each test cancels its turn when done.
SLOW_TURN = "SLOW: 90"


@pytest.fixture(scope="module")
def approvals(stack_env):
    made = Approvals(stack_env["settings"])
    yield made
    made.close()


@pytest.fixture(scope="module")
def session_id(stack_env, token):
    """One ready session for the module's turns (each costs a container)."""
    api = client_for(stack_env, token, OWNER)
    sid = api.create_session()["id"]
    wait_for(lambda: api.session(sid)["status"] == "ready", timeout=120, what=f"session {sid} to be ready")
    yield sid
    api.delete_session(sid)


def turn_ids(api: Client, sid: str) -> set[str]:
    return {t["id"] for t in api.turns(sid, limit=200)["items"]}


def running_turn(api: Client, sid: str, turn_id: str | None = None, before: set[str] = frozenset()) -> dict:
    """The turn given, or else the session's one turn not in `before` (sent by ccd), once it runs."""
    def running():
        found = [api.turn(turn_id)] if turn_id else [t for t in api.turns(sid, limit=200)["items"]
                                                     if t["id"] not in before]
        return found[0] if len(found) == 1 and found[0]["status"] == "running" else None
    return wait_for(running, timeout=120, what="the turn to run")


def cancel(api: Client, turn_id: str) -> None:
    if api.turn(turn_id)["status"] in ("queued", "running"):
        api.cancel(turn_id)


def test_client_lists_and_answers_approvals_and_raises_the_servers_codes(stack_env, token, session_id, approvals):
    api = client_for(stack_env, token, OWNER)
    turn = running_turn(api, session_id, api.chat(session_id, SLOW_TURN)["id"])
    try:
        approvals.open(turn, "toolu_allow", "echo from-the-model", publish=False)
        approvals.open(turn, "toolu_deny", "rm -rf /tmp/x", publish=False)
        listed = api.approvals(turn["id"])
        assert [(a["request_id"], a["status"], a["tool_name"]) for a in listed] == [
            ("toolu_allow", "pending", "Bash"), ("toolu_deny", "pending", "Bash")], listed
        assert listed[0]["input"]["command"] == "echo from-the-model" and listed[0]["turn_id"] == turn["id"]
        assert sorted(a["request_id"] for a in api.turn(turn["id"])["pending_approvals"]) == ["toolu_allow",
                                                                                              "toolu_deny"]

        allowed = api.answer_approval(turn["id"], "toolu_allow", "allow", updated_input={"command": "echo edited"})
        assert allowed["status"] == "allowed" and allowed["decided_by"] and OWNER in allowed["decided_by"], allowed
        assert allowed["decision"]["updated_input"] == {"command": "echo edited"}, allowed
        with pytest.raises(Conflict) as twice:
            api.answer_approval(turn["id"], "toolu_allow", "deny")
        assert twice.value.status == 409 and twice.value.code == "approval_resolved"
        with pytest.raises(NotFound) as unknown:
            api.answer_approval(turn["id"], "toolu_nobody_asked", "allow")
        assert unknown.value.status == 404 and unknown.value.code == "not_found"
        with pytest.raises(NotFound) as other_owner:
            client_for(stack_env, token, "someone-else").answer_approval(turn["id"], "toolu_deny", "allow")
        assert other_owner.value.code == "not_found"
        with pytest.raises(NotFound):
            client_for(stack_env, token, "someone-else").approvals(turn["id"])
        with pytest.raises(ValidationError) as bad:
            api.answer_approval(turn["id"], "toolu_deny", "maybe")
        assert bad.value.status == 400

        denied = api.answer_approval(turn["id"], "toolu_deny", "deny", message="not that one")
        assert denied["status"] == "denied" and denied["decision"]["message"] == "not that one", denied
        assert [a["status"] for a in api.approvals(turn["id"])] == ["allowed", "denied"]
        assert api.turn(turn["id"])["pending_approvals"] == []
    finally:
        cancel(api, turn["id"])


def test_ccd_chat_without_a_terminal_says_how_to_answer_and_ccd_approve_answers(stack_env, token, session_id,
                                                                                 approvals):
    api = client_for(stack_env, token, OWNER)
    env = {**os.environ, "CCD_URL": stack_env["base"], "CCD_TOKEN": token(OWNER)}
    before = turn_ids(api, session_id)
    chat = subprocess.Popen([sys.executable, "-m", "client.cli", "chat", session_id, SLOW_TURN], cwd=ROOT, env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    errors = Lines(chat.stderr)
    turn = running_turn(api, session_id, before=before)
    try:
        approvals.open(turn, "toolu_cli", "echo asked")
        hint = f"answer with: ccd approve {turn['id']} toolu_cli"
        errors.wait_for(hint)
        assert "approval requested: Bash (request toolu_cli)" in errors.text and '"command": "echo asked"' in errors.text

        listed = ccd(stack_env, token, OWNER, "approvals", turn["id"])
        assert listed.returncode == 0 and listed.stdout.split()[:3] == ["toolu_cli", "pending", "Bash"], listed
        answered = ccd(stack_env, token, OWNER, "approve", turn["id"], "toolu_cli", "--input",
                       '{"command": "echo edited"}', "--remember")
        assert answered.returncode == 0 and answered.stdout.strip() == "toolu_cli allowed", answered
        errors.wait_for(f"[approval toolu_cli: allowed by {OWNER}")
        assert api.approvals(turn["id"])[0]["decision"]["updated_input"] == {"command": "echo edited"}
        assert "Bash(echo:*)" in approvals.session_rules(session_id)  # remembered for the session

        twice = ccd(stack_env, token, OWNER, "approve", turn["id"], "toolu_cli", "--deny")
        assert twice.returncode == 2 and "approval_resolved" in twice.stderr, twice
        assert ccd(stack_env, token, OWNER, "approve", turn["id"], "toolu_missing").returncode == 4
        assert ccd(stack_env, token, OWNER, "approve", str(uuid.uuid4()), "toolu_cli").returncode == 4
        misuse = ccd(stack_env, token, OWNER, "approve", turn["id"], "toolu_cli", "--deny", "--remember")
        assert misuse.returncode == 2 and "--remember" in misuse.stderr
        bad_input = ccd(stack_env, token, OWNER, "approve", turn["id"], "toolu_cli", "--input", "[1]")
        assert bad_input.returncode == 2 and "--input must be a JSON object" in bad_input.stderr

        approvals.open(turn, "toolu_cli_deny", "echo no")
        errors.wait_for(f"ccd approve {turn['id']} toolu_cli_deny")
        denied = ccd(stack_env, token, OWNER, "approve", turn["id"], "toolu_cli_deny", "--deny", "--message", "nope")
        assert denied.returncode == 0 and denied.stdout.strip() == "toolu_cli_deny denied", denied
        errors.wait_for(f"[approval toolu_cli_deny: denied by {OWNER}")
        assert "nope]" in errors.text
    finally:
        cancel(api, turn["id"])
        assert chat.wait(60) == 1, errors.text  # the cancelled turn
        errors.join()


def test_ccd_chat_asks_on_a_terminal_and_withdraws_a_question_answered_elsewhere(stack_env, token, session_id,
                                                                               approvals):
    api = client_for(stack_env, token, OWNER)
    env = {**os.environ, "CCD_URL": stack_env["base"], "CCD_TOKEN": token(OWNER)}
    before = turn_ids(api, session_id)
    master, slave = pty.openpty()  # ccd's stdin is a terminal: it asks there
    chat = subprocess.Popen([sys.executable, "-m", "client.cli", "chat", session_id, SLOW_TURN], cwd=ROOT, env=env,
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    os.close(slave)
    errors = Lines(chat.stderr)
    turn = running_turn(api, session_id, before=before)
    try:
        approvals.open(turn, "toolu_tty", "echo asked on a terminal")
        errors.wait_for("Allow? [y]es / [n]o / [a]lways allow")
        assert '"command": "echo asked on a terminal"' in errors.text and "answer with:" not in errors.text
        os.write(master, b"what?\n")
        errors.wait_for("please answer y, n or a")
        os.write(master, b"y\n")
        errors.wait_for(f"[approval toolu_tty: allowed by {OWNER} via rest]")
        assert api.approvals(turn["id"])[0]["status"] == "allowed"

        approvals.open(turn, "toolu_tty_deny", "echo denied on a terminal")
        errors.wait_for("Allow?", after="toolu_tty_deny")
        os.write(master, b"n\n")
        errors.wait_for("Message for the model")
        os.write(master, b"not on a Friday\n")
        errors.wait_for(f"[approval toolu_tty_deny: denied by {OWNER} via rest: not on a Friday]")
        assert [a["status"] for a in api.approvals(turn["id"])] == ["allowed", "denied"]

        # Answered by another client while ccd asks: the question is withdrawn within its poll interval.
        approvals.open(turn, "toolu_elsewhere", "echo answered elsewhere")
        errors.wait_for("Allow?", after="toolu_elsewhere")
        api.answer_approval(turn["id"], "toolu_elsewhere", "deny", message="from another client")
        errors.wait_for("(no longer waiting: answered elsewhere or timed out)", timeout=10)
        errors.wait_for("[approval toolu_elsewhere: denied by")
    finally:
        cancel(api, turn["id"])
        assert chat.wait(60) == 1, errors.text
        errors.join()
        os.close(master)


class Lines:
    """Collects a process's output stream in a thread, so a test can wait for what it says."""

    def __init__(self, stream) -> None:
        self.text, self.lock = "", threading.Lock()
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream) -> None:
        while chunk := stream.read(1):
            with self.lock:
                self.text += chunk

    def wait_for(self, needle: str, after: str = "", timeout: float = 60) -> None:
        """Waits until `needle` appears (after the last `after`, when given)."""
        def seen():
            with self.lock:
                start = self.text.rfind(after) if after else 0
                return start >= 0 and needle in self.text[start:]
        deadline = time.monotonic() + timeout
        while not seen():
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.text}"
            time.sleep(0.05)

    def join(self) -> None:
        self.thread.join(10)
