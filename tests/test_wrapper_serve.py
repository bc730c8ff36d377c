"""`wrapper serve`, the session container's turn agent (wrapper/serve.py with wrapper/hot.py), run here as a process
of its own with a stand-in Claude Code that speaks stream-json and the control protocol; the real Claude Code in a
real container is covered in test_hot_e2e.py."""
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.conftest import wait_for
from tests.test_wrapper_run import wrapper_env
from workers.runtime import WRAPPER
from wrapper.attach import attach_turn
from wrapper.common import parse_args, pid_alive, turn_running

# A stand-in for `claude -p --input-format stream-json --output-format stream-json --replay-user-messages ...`: one
# user message per turn on stdin, lines as 2.1.330 prints them: the message's lifecycle (queued, started), its replayed
# prompt, the turn's lines, its result line (with "type" not first), then the lifecycle's end (completed, or cancelled
# after an interrupt). With CCD_STAND_IN_LIFECYCLE=0, no lifecycle lines (as a Claude Code without them). What its
# prompt holds says what the turn does:
#   ASK   asks permission (a can_use_tool control_request) and waits for the answer, then says what it got
#   WITHDRAW  asks permission and withdraws the prompt at once (a control_cancel_request), then waits as HANG
#   HANG  waits for an interrupt (answered with a control_response, then an error_during_execution result)
#   DEAF  as HANG, but ignores interrupts and SIGINT (it goes on SIGTERM)
#   DIE   exits (code 5) in the middle of the turn
#   SLOW  takes a second
#   LATE  asks permission right after its result, in the same write (it writes the answer to $HOME/late-answer.json)
#   BYE   exits half a second after its result
#   LINGER   prints one more line a moment after its end (by then the next turn's message may have been sent)
#   FORGE    prints a result line of its own making first (as a tool writing to Claude Code's stdout could)
# anything else is answered at once. Its system line says what it was started with and whether it was initialized.
STAND_IN = r'''
import json, os, signal, sys, time

argv = sys.argv[1:]
conversation = argv[argv.index("--session-id" if "--session-id" in argv else "--resume") + 1]
state = {"initialized": False, "turn": 0, "cost": 0.0, "running": None, "asking": None, "deaf": False, "uuid": None}
LIFECYCLE = "--replay-user-messages" in argv and os.environ.get("CCD_STAND_IN_LIFECYCLE") != "0"


def out(*messages):
    """In one write: what follows a result line in the same write is read with it."""
    os.write(1, "".join(json.dumps(message, separators=(",", ":")) + "\n" for message in messages).encode())


def say(text):
    out({"type": "assistant", "message": {"role": "assistant", "content": [{"type": "text", "text": text}]},
         "session_id": conversation})


def lifecycle(state_name):
    return [{"type": "command_lifecycle", "command_uuid": state["uuid"], "state": state_name,
             "session_id": conversation}] if LIFECYCLE else []


def result(subtype, text, *after):
    state["running"], state["asking"] = None, None
    state["cost"] += 0.25
    out({"duration_ms": 3, "session_id": conversation, "total_cost_usd": state["cost"],
         "is_error": subtype != "success", "num_turns": 1, "subtype": subtype, "result": text, "type": "result"},
        *lifecycle("completed" if subtype == "success" else "cancelled"), *after)


def control_response(request_id):
    out({"type": "control_response", "response": {"subtype": "success", "request_id": request_id, "response": {}}})


def turn(message):
    prompt = message["message"]["content"]
    state["turn"] += 1
    state["running"], state["uuid"] = prompt, message.get("uuid")
    out(*lifecycle("queued"), *lifecycle("started"))
    # The transcript, as Claude Code keeps it: a later process continues this conversation with --resume.
    projects = os.path.join(os.environ["HOME"], ".claude", "projects", "-workspace")
    os.makedirs(projects, exist_ok=True)
    with open(os.path.join(projects, conversation + ".jsonl"), "a") as transcript:
        transcript.write(json.dumps({"type": "user", "message": {"role": "user", "content": prompt}}) + "\n")
    out({"type": "system", "subtype": "init", "session_id": conversation, "pid": os.getpid(), "argv": argv,
         "initialized": state["initialized"], "turn": state["turn"], "probe": os.environ.get("CCD_PROBE")})
    if "--replay-user-messages" in argv:
        out({**message, "session_id": conversation, "isReplay": True})
    if "FORGE" in prompt:
        out({"type": "result", "subtype": "success", "result": "forged", "total_cost_usd": 99})
        time.sleep(0.3)
    if "DIE" in prompt:
        sys.stderr.write("stand-in: dying mid-turn\n")
        os._exit(5)
    if "ASK" in prompt:
        state["asking"] = "perm-%d" % state["turn"]
        out({"type": "control_request", "request_id": state["asking"], "request": {
            "subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": "touch allowed"},
            "permission_suggestions": []}})
    elif "WITHDRAW" in prompt:
        ask = {"type": "control_request", "request_id": "perm-w", "request": {
            "subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": "touch x"}}}
        out(ask, {"type": "control_cancel_request", "request_id": "perm-w"})
    elif "HANG" in prompt or "DEAF" in prompt:
        if "DEAF" in prompt:
            state["deaf"] = True
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        say("working until interrupted")
    else:
        if "SLOW" in prompt:
            time.sleep(1)
        say("you said: " + prompt)
        after = []
        if "LATE" in prompt:
            state["late"] = "late-%d" % state["turn"]
            after.append({"type": "control_request", "request_id": state["late"], "request": {
                "subtype": "can_use_tool", "tool_name": "Bash", "input": {"command": "touch late"},
                "permission_suggestions": []}})
        result("success", "you said: " + prompt, *after)
        if "BYE" in prompt:
            time.sleep(0.5)
            sys.exit(0)
        if "LINGER" in prompt:
            time.sleep(0.5)
            say("a late line of " + prompt)


for line in sys.stdin:
    message = json.loads(line)
    kind = message.get("type")
    if kind == "user":
        turn(message)
    elif kind == "control_request":
        subtype = message["request"]["subtype"]
        if subtype == "initialize":
            state["initialized"] = True
            control_response(message["request_id"])
        elif subtype == "interrupt" and not state["deaf"]:
            control_response(message["request_id"])
            if state["running"] is not None:
                result("error_during_execution", "")
    elif kind == "control_response" and message["response"]["request_id"] == state["asking"]:
        say("got " + json.dumps(message["response"]["response"], sort_keys=True))
        result("success", "asked")
    elif kind == "control_response" and message["response"]["request_id"] == state.get("late"):
        with open(os.path.join(os.environ["HOME"], "late-answer.json"), "w") as answer:
            json.dump(message["response"], answer)
    elif kind == "control_response":
        say("an answer to nothing: " + message["response"]["request_id"])
'''


def stand_in(tmp_path) -> None:
    path = tmp_path / "claude"
    path.write_text(f"#!{sys.executable}\n{STAND_IN}")
    path.chmod(0o755)


class Agent:
    """A running `wrapper serve`: requests in, stdout lines out."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        stand_in(tmp_path)
        # The worker's own interpreter line (workers/runtime.WRAPPER) with this interpreter for the container's; in
        # tmp_path, as a container's agent runs in /workspace.
        self.proc = subprocess.Popen([sys.executable, *WRAPPER[1:], "serve"], env=wrapper_env(tmp_path), cwd=tmp_path,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pending = b""

    def ask(self, turn_id: str, prompt: str = "hi", *flags: str, hot: str = "30", expires_in: float = 30,
            **env: str) -> str:
        """Asks for a turn (kept hot `hot` seconds; its process id P-<turn id> unless given); its nonce."""
        nonce = uuid.uuid4().hex
        args = ["run", "--turn-id", turn_id, "--log-dir", str(self.tmp_path / "turns"), "--session-id", "c1",
                "--claude", str(self.tmp_path / "claude"), "--grace", "1", "--hot", hot, *flags]
        env.setdefault("CCD_PROCESS_ID", f"P-{turn_id}")
        self.request({"nonce": nonce, "expires": time.time() + expires_in, "args": args, "env": env,
                      "prompt": prompt})
        return nonce

    def control(self, control: str, **fields) -> str:
        """Sends a control command; its nonce."""
        nonce = uuid.uuid4().hex
        self.request({"nonce": nonce, "expires": time.time() + 30, "control": control, **fields})
        return nonce

    def answer_of(self, nonce: str) -> str:
        """A control command's outcome (its `done` line)."""
        return self.lines_until(f"done\t{nonce}\t")[-1].split("\t")[2]

    def request(self, request: dict) -> None:
        self.send(json.dumps(request).encode() + b"\n")

    def send(self, data: bytes) -> None:
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def lines_until(self, last: str, timeout: float = 15) -> list[str]:
        """Stdout lines up to and including the first that starts with `last`."""
        lines, deadline = [], time.monotonic() + timeout
        while True:
            while b"\n" in self.pending:
                line, self.pending = self.pending.split(b"\n", 1)
                lines.append(line.decode())
                if lines[-1].startswith(last):
                    return lines
            left = deadline - time.monotonic()
            assert left > 0 and select.select([self.proc.stdout], [], [], left)[0], f"no {last!r} in {lines}"
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"serve ended before {last!r}: {lines}"
            self.pending += chunk

    def turn(self, turn_id: str, prompt: str = "hi", *flags: str, **options) -> "Turn":
        """Asks for a turn and reads it to its end."""
        nonce = self.ask(turn_id, prompt, *flags, **options)
        return Turn(nonce, self.lines_until(f"end\t{nonce}\t"))

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


class Turn:
    """One turn's stdout, from its `accepted` to its `end` marker."""

    def __init__(self, nonce: str, lines: list[str]) -> None:
        self.nonce, self.lines = nonce, lines
        start = next(i for i, line in enumerate(lines) if line.startswith(f"start\t{nonce}\t"))
        self.process_id = lines[start].split("\t")[2]
        self.records = lines[start + 1:-1]
        self.code = int(lines[-1].split("\t")[2])
        tag, record = self.records[-1].split("\t", 1)
        assert tag == "exit", self.records
        self.exit = json.loads(record)

    def messages(self) -> list[dict]:
        """Claude Code's lines, in their numbered order."""
        numbered = [record.split("\t", 1) for record in self.records[:-1]]
        assert [tag for tag, _ in numbered] == [str(n) for n in range(1, len(numbered) + 1)], self.records
        return [json.loads(line) for _, line in numbered]

    def system(self) -> dict:
        return next(m for m in self.messages() if m.get("subtype") == "init")

    def texts(self) -> list[str]:
        return [m["message"]["content"][0]["text"] for m in self.messages() if m["type"] == "assistant"]


@pytest.fixture
def agent(tmp_path):
    agent = Agent(tmp_path)
    yield agent
    agent.close()


def gone(pid: int, timeout: float = 10) -> bool:
    return wait_for(lambda: not pid_alive(pid), timeout, interval=0.05, what=f"process {pid} to end")


# A turn and its records.

def test_serve_runs_a_turn_in_claude_code_between_its_markers_and_logs_its_numbered_lines(tmp_path, agent):
    turn = agent.turn("t1", "the prompt", CCD_PROBE="from the request")
    assert turn.lines[:2] == [f"accepted\t{turn.nonce}", f"start\t{turn.nonce}\tP-t1"]
    assert turn.lines[-1] == f"end\t{turn.nonce}\t0"
    # Neither the answer to serve's initialize, nor the message's lifecycle, nor its replayed prompt is the turn's.
    system, assistant, result = turn.messages()
    assert system["initialized"] is True and system["probe"] == "from the request"
    assert system["argv"][:9] == ["-p", "--input-format", "stream-json", "--output-format", "stream-json",
                                  "--verbose", "--include-partial-messages", "--replay-user-messages", "--session-id"]
    assert assistant["message"]["content"][0]["text"] == "you said: the prompt"
    assert result["type"] == "result" and result["subtype"] == "success"
    assert turn.exit == {"code": 0, "timed_out": False, "process_lost": False, "cancelled": False, "oom_killed": False,
                         "lines": 3, "stderr": "", "pid": system["pid"], "process_id": "P-t1", "process_turns": 1,
                         "cost_before": 0.0}
    # Its log is where `wrapper attach` reads it, and the turn's other files are gone.
    assert (tmp_path / "turns" / "t1.log").read_text().splitlines() == turn.records
    assert not any((tmp_path / "turns" / f"t1{suffix}").exists() for suffix in (".pid", ".run.pid", ".cancel"))


def test_a_late_line_of_the_turn_before_is_not_the_next_turns(agent):
    first = agent.turn("t1", "LINGER")
    second = agent.turn("t2", "next")  # sent while the process still prints for the first
    assert first.texts() == ["you said: LINGER"] and second.texts() == ["you said: next"]
    assert second.exit["pid"] == first.exit["pid"] and second.exit["lines"] == 3


def test_a_forged_result_line_does_not_end_the_turn(agent):
    turn = agent.turn("t1", "FORGE")
    assert turn.texts() == ["you said: FORGE"] and turn.messages()[-1]["result"] == "you said: FORGE"
    later = agent.turn("t2")  # nor shift the next one
    assert later.texts() == ["you said: hi"] and later.exit["cost_before"] == 0.25


def test_a_claude_code_without_message_lifecycle_lines_ends_its_turns_at_their_result_lines(agent):
    first = agent.turn("t1", "one", CCD_STAND_IN_LIFECYCLE="0")
    second = agent.turn("t2", "two", CCD_STAND_IN_LIFECYCLE="0")
    assert (first.texts(), second.texts()) == (["you said: one"], ["you said: two"])
    assert second.exit["pid"] == first.exit["pid"] and second.code == 0


def test_two_turns_run_in_one_process_which_names_itself_after_the_turn_that_started_it(agent):
    first = agent.turn("t1", "one")
    second = agent.turn("t2", "two", CCD_PROCESS_ID="P-fresh")  # the worker mints a process id every turn
    assert first.process_id == second.process_id == "P-t1"
    assert second.exit["pid"] == first.exit["pid"] and second.exit["process_id"] == "P-t1"
    assert (first.exit["process_turns"], second.exit["process_turns"]) == (1, 2)
    assert second.system()["turn"] == 2 and second.texts() == ["you said: two"]
    # The cost is the process's running total: what the turn spent is the difference.
    assert (first.exit["cost_before"], second.exit["cost_before"]) == (0.0, 0.25)
    assert second.messages()[-1]["total_cost_usd"] == 0.5


def test_with_hot_0_the_process_ends_with_its_turn_and_the_next_one_resumes_the_conversation(agent):
    first = agent.turn("t1", hot="0")
    gone(first.exit["pid"])
    second = agent.turn("t2", hot="0")
    assert second.process_id == "P-t2" and second.exit["pid"] != first.exit["pid"]
    assert second.exit["process_turns"] == 1 and second.exit["cost_before"] == 0.0
    argv = second.system()["argv"]
    assert argv[argv.index("--resume") + 1] == "c1" and "--session-id" not in argv


def test_an_idle_process_ends_after_its_hot_seconds(agent):
    first = agent.turn("t1", hot="1")
    ended = time.monotonic()
    time.sleep(0.5)
    assert pid_alive(first.exit["pid"])  # still hot
    gone(first.exit["pid"])
    assert 0.9 <= time.monotonic() - ended < 5
    second = agent.turn("t2", hot="1")
    assert second.process_id == "P-t2" and second.exit["pid"] != first.exit["pid"]


def test_a_turn_with_other_flags_or_environment_starts_a_new_process(agent):
    first = agent.turn("t1")
    second = agent.turn("t2", "hi", "--model", "m2")
    assert second.process_id == "P-t2" and second.exit["pid"] != first.exit["pid"]
    assert not pid_alive(first.exit["pid"])  # the old one ended before the new one started
    argv = second.system()["argv"]
    assert argv[argv.index("--model") + 1] == "m2"
    third = agent.turn("t3", "hi", "--model", "m2", CCD_PROBE="changed")
    assert third.process_id == "P-t3" and third.system()["probe"] == "changed"
    # The per-turn credentials are not the process's flags: they do not cost a process.
    fourth = agent.turn("t4", "hi", "--model", "m2", CCD_PROBE="changed", ANTHROPIC_API_KEY="another",
                        CCD_SESSION_TOKEN="another")
    assert fourth.process_id == "P-t3" and fourth.exit["process_turns"] == 2


def test_permission_prompts_are_recorded_and_answers_reach_claude_code_with_their_request_id(agent):
    nonce = agent.ask("t1", "ASK", "--approvals", "ask")
    head = agent.lines_until("2\t")
    prompt = json.loads(head[-1].split("\t", 1)[1])
    assert prompt["type"] == "control_request" and prompt["request"]["subtype"] == "can_use_tool"
    assert agent.answer_of(agent.control("answer", turn_id="t1", request_id="perm-other",
                                         response={"behavior": "allow"})) == "unknown"
    assert agent.answer_of(agent.control("answer", turn_id="t-other", request_id=prompt["request_id"],
                                         response={"behavior": "allow"})) == "unknown"
    response = {"behavior": "allow", "updatedInput": {"command": "touch edited"}}
    assert agent.answer_of(agent.control("answer", turn_id="t1", request_id=prompt["request_id"],
                                         response=response)) == "ok"
    turn = Turn(nonce, head + agent.lines_until(f"end\t{nonce}\t"))
    assert turn.texts() == ["got " + json.dumps(response, sort_keys=True)]
    assert turn.exit["code"] == 0 and turn.exit["lines"] == 4
    assert "--permission-prompt-tool" in turn.system()["argv"]
    # Answered once: a second answer (a re-attached worker's) is for nothing it waits for.
    assert agent.answer_of(agent.control("answer", turn_id="t1", request_id=prompt["request_id"],
                                         response=response)) == "unknown"


def test_a_turns_timeout_clock_stops_while_a_permission_prompt_waits(agent):
    nonce = agent.ask("t1", "ASK", "--timeout", "1", "--approvals", "ask")
    prompt = json.loads(agent.lines_until("2\t")[-1].split("\t", 1)[1])
    time.sleep(2)
    assert agent.answer_of(agent.control("answer", turn_id="t1", request_id=prompt["request_id"],
                                         response={"behavior": "deny", "message": "no"})) == "ok"
    lines = agent.lines_until(f"end\t{nonce}\t")
    exit_record = json.loads(lines[-2].split("\t", 1)[1])
    assert exit_record["timed_out"] is False and exit_record["cancelled"] is False and lines[-1].endswith("\t0")


def test_a_permission_prompt_claude_code_withdraws_takes_no_answer_and_the_clock_runs_again(agent):
    started = time.monotonic()
    nonce = agent.ask("t1", "WITHDRAW", "--timeout", "1", "--approvals", "ask")
    lines = agent.lines_until("3\t")
    assert [json.loads(line.split("\t", 1)[1])["type"] for line in lines[-2:]] == ["control_request",
                                                                                 "control_cancel_request"]
    assert agent.answer_of(agent.control("answer", turn_id="t1", request_id="perm-w",
                                         response={"behavior": "allow"})) == "unknown"
    lines = agent.lines_until(f"end\t{nonce}\t")
    assert 1 <= time.monotonic() - started < 5
    assert json.loads(lines[-2].split("\t", 1)[1])["timed_out"] is True


def test_a_turn_past_its_timeout_is_interrupted_and_its_process_kept(agent):
    started = time.monotonic()
    turn = agent.turn("t1", "HANG", "--timeout", "0.5")
    assert 0.5 <= time.monotonic() - started < 5
    assert turn.exit["timed_out"] is True and turn.exit["cancelled"] is False and turn.code == 0
    assert turn.messages()[-1]["subtype"] == "error_during_execution"
    assert agent.turn("t2").exit["pid"] == turn.exit["pid"]


def test_a_prompt_larger_than_a_pipe_reaches_claude_code_whole(agent):
    turn = agent.turn("t1", "x" * 300_000)
    assert turn.texts() == ["you said: " + "x" * 300_000] and turn.code == 0


def test_a_permission_prompt_after_the_turns_result_is_denied_since_no_turn_can_ask(tmp_path, agent):
    turn = agent.turn("t1", "LATE", "--approvals", "ask")
    assert [m["type"] for m in turn.messages()] == ["system", "assistant", "result"]
    answer = json.loads(wait_for(lambda: (tmp_path / "late-answer.json").exists()
                                 and (tmp_path / "late-answer.json").read_text(), 10, what="the late answer"))
    assert answer["request_id"] == "late-1" and answer["response"]["behavior"] == "deny"
    later = agent.turn("t2", "hi", "--approvals", "ask")  # the process serves on; the late line is in no turn
    assert later.exit["pid"] == turn.exit["pid"] and [m["type"] for m in later.messages()][0] == "system"


def test_a_process_that_ends_while_idle_is_replaced_by_the_next_turn(agent):
    first = agent.turn("t1", "BYE")
    assert first.code == 0 and first.exit["process_lost"] is False
    gone(first.exit["pid"])
    second = agent.turn("t2")
    assert second.process_id == "P-t2" and second.exit["pid"] != first.exit["pid"] and second.code == 0


# Stopping a turn.

def test_an_interrupt_ends_the_turn_as_cancelled_and_keeps_the_process(agent):
    nonce = agent.ask("t1", "HANG")
    agent.lines_until("2\t")  # it is running
    assert agent.answer_of(agent.control("interrupt", turn_id="t-other")) == "unknown"
    started = time.monotonic()
    assert agent.answer_of(agent.control("interrupt", turn_id="t1")) == "ok"
    lines = agent.lines_until(f"end\t{nonce}\t")
    assert time.monotonic() - started < 1  # Claude Code ended it: no signals, no grace
    exit_record = json.loads(lines[-2].split("\t", 1)[1])
    assert exit_record["cancelled"] is True and exit_record["process_lost"] is False and lines[-1].endswith("\t0")
    assert json.loads(lines[-3].split("\t", 1)[1])["subtype"] == "error_during_execution"
    assert pid_alive(exit_record["pid"])
    later = agent.turn("t2")
    assert later.exit["pid"] == exit_record["pid"] and later.exit["process_turns"] == 2


def test_claude_code_that_ignores_an_interrupt_gets_signals_after_the_grace_and_the_next_turn_a_new_one(agent):
    nonce = agent.ask("t1", "DEAF")
    agent.lines_until("2\t")
    started = time.monotonic()
    assert agent.answer_of(agent.control("interrupt", turn_id="t1")) == "ok"
    lines = agent.lines_until(f"end\t{nonce}\t")
    # --grace 1: the interrupt, then SIGINT (ignored), then SIGTERM.
    assert 2 <= time.monotonic() - started < 6
    exit_record = json.loads(lines[-2].split("\t", 1)[1])
    assert lines[-1] == f"end\t{nonce}\t{-signal.SIGTERM}" and exit_record["code"] == -signal.SIGTERM
    assert exit_record["cancelled"] is True and exit_record["process_lost"] is False
    later = agent.turn("t2")
    assert later.process_id == "P-t2" and later.exit["pid"] != exit_record["pid"]


def test_claude_code_exiting_mid_turn_is_a_lost_process_and_the_next_turn_gets_a_new_one(agent):
    turn = agent.turn("t1", "DIE")
    assert turn.code == 5 and turn.exit["code"] == 5 and turn.exit["process_lost"] is True
    assert turn.exit["cancelled"] is False and "stand-in: dying mid-turn" in turn.exit["stderr"]
    later = agent.turn("t2")
    assert later.process_id == "P-t2" and later.exit["pid"] != turn.exit["pid"] and later.code == 0


def test_a_new_request_interrupts_the_running_turn_first_so_their_lines_never_mix(agent):
    first = agent.ask("t1", "HANG")
    agent.lines_until("2\t")
    second = agent.ask("t2", "second")
    lines = agent.lines_until(f"end\t{second}\t")
    assert lines[0] == f"accepted\t{second}"
    ended = lines.index(f"end\t{first}\t0")
    stopped = json.loads(lines[ended - 1].split("\t", 1)[1])
    assert json.loads(lines[ended - 2].split("\t", 1)[1])["subtype"] == "error_during_execution"
    # Superseded is not cancelled: the worker that gave it up says why it ended.
    assert stopped["cancelled"] is False and stopped["timed_out"] is False
    later = Turn(second, lines[ended + 1:])
    assert lines[ended + 1] == f"start\t{second}\tP-t1" and later.texts() == ["you said: second"]
    assert later.exit["pid"] == stopped["pid"]


def test_a_request_superseded_before_it_started_ends_without_running(agent):
    first = agent.ask("t1", "DEAF")
    agent.lines_until("2\t")
    second = agent.ask("t2", "second")  # waits for the first to be stopped (by signals: it ignores interrupts)
    assert agent.lines_until(f"accepted\t{second}")[-1] == f"accepted\t{second}"
    third = agent.ask("t3", "third")
    lines = agent.lines_until(f"end\t{third}\t")
    assert lines[:2] == [f"accepted\t{third}", f"end\t{second}\t{-signal.SIGTERM}"]
    assert not any(line.startswith(f"start\t{second}") for line in lines)
    assert lines.index(f"end\t{first}\t{-signal.SIGTERM}") < lines.index(f"start\t{third}\tP-t3")
    assert Turn(third, lines).texts() == ["you said: third"]


def test_a_turn_cancelled_before_it_started_ends_as_cancelled(tmp_path, agent):
    (tmp_path / "turns").mkdir()
    (tmp_path / "turns" / "t1.cancel").touch()  # `wrapper cancel` came first
    started = time.monotonic()
    turn = agent.turn("t1", "HANG")
    assert time.monotonic() - started < 1  # Claude Code stopped it: no signals
    assert turn.exit["cancelled"] is True and turn.code == 0
    assert agent.turn("t2").exit["pid"] == turn.exit["pid"]


# The host's LRU.

def test_cool_ends_an_idle_process_and_is_refused_while_a_turn_runs(agent):
    assert agent.answer_of(agent.control("cool")) == "idle"  # nothing to end
    nonce = agent.ask("t1", "HANG")
    agent.lines_until("2\t")
    assert agent.answer_of(agent.control("cool")) == "busy"
    assert agent.answer_of(agent.control("interrupt", turn_id="t1")) == "ok"
    pid = json.loads(agent.lines_until(f"end\t{nonce}\t")[-2].split("\t", 1)[1])["pid"]
    assert pid_alive(pid)
    assert agent.answer_of(agent.control("cool")) == "ok"
    gone(pid)
    assert agent.answer_of(agent.control("cool")) == "idle"
    assert agent.turn("t2").process_id == "P-t2"


# Requests serve does not run.

def test_a_request_past_its_expiry_is_answered_stale_and_runs_nothing(tmp_path, agent):
    nonce = agent.ask("t1", expires_in=-1)
    assert agent.lines_until("stale") == [f"stale\t{nonce}"]
    agent.send(json.dumps({"nonce": "late", "expires": time.time() - 1, "control": "cool"}).encode() + b"\n")
    assert agent.lines_until("stale") == ["stale\tlate"]
    later = agent.turn("t2")  # and it serves on
    assert later.code == 0 and later.system()["turn"] == 1
    assert not (tmp_path / "turns" / "t1.log").exists()


def test_a_request_that_is_not_one_is_ignored_and_serving_goes_on(agent):
    agent.send(b"not json\n")
    agent.send(json.dumps({"nonce": "x", "expires": time.time() + 30, "args": ["sh", "-c", "touch x"]}).encode()
               + b"\n")
    agent.send(json.dumps({"nonce": "y", "expires": time.time() + 30, "control": "shutdown"}).encode() + b"\n")
    turn = agent.turn("t1")
    assert turn.lines[0] == f"accepted\t{turn.nonce}" and turn.code == 0
    agent.close()
    assert agent.proc.stderr.read().decode().count("not a request; ignored") == 3


def test_a_bad_command_line_ends_its_turn_with_code_2(agent):
    nonce = agent.ask("t1", "hi", "--colour", "red")
    assert agent.lines_until(f"end\t{nonce}\t")[-2:] == [f"start\t{nonce}\t", f"end\t{nonce}\t2"]
    assert agent.turn("t2").code == 0


def test_a_missing_claude_code_is_an_exit_record_with_code_127(tmp_path, agent):
    (tmp_path / "claude").unlink()
    nonce = agent.ask("t1")
    lines = agent.lines_until(f"end\t{nonce}\t")
    assert lines[-1] == f"end\t{nonce}\t127"
    exit_record = json.loads(lines[-2].split("\t", 1)[1])
    assert exit_record["code"] == 127 and "could not start Claude Code" in exit_record["stderr"]
    stand_in(tmp_path)
    assert agent.turn("t2").code == 0


# Serve's own end.

def test_a_closed_stdin_ends_serve_once_the_turn_going_on_has_ended(agent):
    nonce = agent.ask("t1", "SLOW")
    agent.lines_until(f"start\t{nonce}\t")
    agent.proc.stdin.close()  # no more requests can come: the container should stop, to be started afresh
    time.sleep(0.3)
    assert agent.proc.poll() is None  # not while the turn runs
    lines = agent.lines_until(f"end\t{nonce}\t")
    assert lines[-1] == f"end\t{nonce}\t0"
    assert agent.proc.wait(5) == 0
    gone(json.loads(lines[-2].split("\t", 1)[1])["pid"])  # and its hot Claude Code with it


def test_serve_ends_at_once_on_sigterm(agent):
    pid = agent.turn("t1").exit["pid"]
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == -signal.SIGTERM
    gone(pid)  # its Claude Code reads the end of its input


def test_a_hot_turn_is_followed_by_wrapper_attach_while_it_runs(tmp_path, agent, capsys):
    """Serve runs under the worker's interpreter line, which names `serve`: how `wrapper attach` (a worker that lost
    the stream) tells that the turn's pid file still names its runner."""
    nonce = agent.ask("t1", "HANG")
    agent.lines_until("2\t")
    base = str(tmp_path / "turns" / "t1")
    assert turn_running(base)
    assert agent.answer_of(agent.control("interrupt", turn_id="t1")) == "ok"
    lines = agent.lines_until(f"end\t{nonce}\t")
    assert not turn_running(base)
    assert attach_turn(parse_args(["attach", "--turn-id", "t1", "--log-dir", str(tmp_path / "turns")])) == 0
    out = capsys.readouterr().out
    assert out == (tmp_path / "turns" / "t1.log").read_text() and out.splitlines()[-1] == lines[-2]
