"""`wrapper serve`, the session container's turn agent (wrapper/serve.py), run here as a process of its own
with a stand-in Claude Code; the container path (docker attach) is covered in test_e2e.py."""
import json
import os
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.test_wrapper_run import fake_claude, wrapper_env
from workers.runtime import WRAPPER
from wrapper import serve


class Agent:
    """A running `wrapper serve`: requests in, stdout lines out."""

    def __init__(self, tmp_path) -> None:
        self.tmp_path = tmp_path
        # In tmp_path, as a container's agent runs in /workspace: what a stand-in Claude Code makes stays there.
        self.proc = subprocess.Popen([sys.executable, *WRAPPER[1:], "serve"], env=wrapper_env(tmp_path), cwd=tmp_path,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.pending = b""

    def ask(self, turn_id: str, prompt: str = "hi", expires_in: float = 30, **env: str) -> str:
        nonce = uuid.uuid4().hex
        args = ["run", "--turn-id", turn_id, "--log-dir", str(self.tmp_path / "turns"), "--session-id", "c1",
                "--claude", str(self.tmp_path / "claude"), "--grace", "1"]
        self.send(json.dumps({"nonce": nonce, "expires": time.time() + expires_in, "args": args, "env": env,
                              "prompt": prompt}).encode() + b"\n")
        return nonce

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

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


@pytest.fixture
def agent(tmp_path):
    agent = Agent(tmp_path)
    yield agent
    agent.close()


def test_serve_runs_a_requested_turn_between_its_start_and_end_markers(tmp_path, agent):
    fake_claude(tmp_path, 'echo "{\\"prompt\\": \\"$(cat)\\", \\"env\\": \\"$CCD_PROBE\\", \\"argv\\": \\"$*\\"}"\n'
                          'exit 3\n')
    nonce = agent.ask("t1", prompt="the prompt", CCD_PROBE="from the request")
    lines = agent.lines_until(f"end\t{nonce}")
    assert lines[:2] == [f"accepted\t{nonce}", f"start\t{nonce}"]
    assert lines[-1] == f"end\t{nonce}\t3"
    tag, line = lines[2].split("\t", 1)
    assert tag == "1" and json.loads(line)["prompt"] == "the prompt" and json.loads(line)["env"] == "from the request"
    assert "--session-id c1" in json.loads(line)["argv"]
    assert lines[3].startswith("exit\t") and json.loads(lines[3].split("\t", 1)[1])["code"] == 3
    assert len(lines) == 5
    # The run is the same program as an exec'd one: its log is where `wrapper attach` reads it.
    assert (tmp_path / "turns" / "t1.log").read_text().splitlines() == lines[2:4]


def test_a_request_past_its_expiry_is_answered_stale_and_runs_nothing(tmp_path, agent):
    fake_claude(tmp_path, 'cat >/dev/null; touch "ran-$CCD_PROBE"\n')
    nonce = agent.ask("t1", expires_in=-1, CCD_PROBE="t1")
    assert agent.lines_until("stale") == [f"stale\t{nonce}"]
    later = agent.ask("t2", CCD_PROBE="t2")  # and it serves on
    assert agent.lines_until(f"end\t{later}")[-1] == f"end\t{later}\t0"
    assert (tmp_path / "ran-t2").exists() and not (tmp_path / "ran-t1").exists()
    assert not (tmp_path / "turns" / "t1.log").exists()


def test_a_new_request_stops_the_run_going_on_first_so_their_lines_never_mix(tmp_path, agent):
    fake_claude(tmp_path, 'if [ "$(cat)" = first ]; then\n'
                          '  trap "echo stopped; exit 130" INT; echo \'{"n": 1}\'; while :; do sleep 0.05; done\n'
                          'fi\necho \'{"n": 2}\'\n')
    first = agent.ask("t1", prompt="first")
    agent.lines_until("1\t")  # it is running
    second = agent.ask("t2", prompt="second")
    lines = agent.lines_until(f"end\t{second}")
    assert lines[0] == f"accepted\t{second}"
    ended = lines.index(f"end\t{first}\t130")
    assert lines[ended - 1].startswith("exit\t") and json.loads(lines[ended - 1].split("\t", 1)[1])["code"] == 130
    assert lines[ended + 1:] == [f"start\t{second}", '1\t{"n": 2}', lines[-2], f"end\t{second}\t0"]


def test_a_request_that_is_not_one_is_ignored_and_serving_goes_on(tmp_path, agent):
    fake_claude(tmp_path, "cat >/dev/null\n")
    agent.send(b"not json\n")
    agent.send(json.dumps({"nonce": "x", "expires": time.time() + 30, "args": ["sh", "-c", "touch x"]}).encode()
               + b"\n")
    nonce = agent.ask("t1")
    assert agent.lines_until(f"end\t{nonce}") == [f"accepted\t{nonce}", f"start\t{nonce}", lines_exit(agent, "t1"),
                                                  f"end\t{nonce}\t0"]
    agent.close()
    assert agent.proc.stderr.read().decode().count("not a turn request; ignored") == 2


def lines_exit(agent: Agent, turn_id: str) -> str:
    return (agent.tmp_path / "turns" / f"{turn_id}.log").read_text().splitlines()[-1]


def test_a_closed_stdin_ends_serve_once_the_run_going_on_has_ended(tmp_path, agent):
    fake_claude(tmp_path, "cat >/dev/null; sleep 1; echo '{}'\n")
    nonce = agent.ask("t1")
    agent.lines_until(f"start\t{nonce}")
    agent.proc.stdin.close()  # no more requests can come: the container should stop, to be started afresh
    time.sleep(0.3)
    assert agent.proc.poll() is None  # not while the turn runs
    assert agent.lines_until(f"end\t{nonce}")[-1] == f"end\t{nonce}\t0"
    assert agent.proc.wait(5) == 0


def test_serve_ends_at_once_on_sigterm(tmp_path, agent):
    time.sleep(0.3)
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(5) == -signal.SIGTERM


def test_serve_starts_runs_with_the_workers_own_interpreter_line():
    assert serve.RUN == WRAPPER[1:]
