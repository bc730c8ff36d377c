"""The wrapper: its re-attach side run directly (following a turn log, a turn that died, old logs,
the conversation), and `wrapper run` as the worker runs it, against stand-ins for Claude Code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from workers.runtime import WRAPPER
from wrapper import run as wrapper
from wrapper.attach import attach_turn
from wrapper.common import parse_args, pid_alive


def attach(tmp_path, turn_id: str, capsys) -> tuple[int, str]:
    code = attach_turn(parse_args(["attach", "--turn-id", turn_id, "--log-dir", str(tmp_path)]))
    return code, capsys.readouterr().out


def test_attach_prints_a_finished_turns_records_and_exits_0(tmp_path, capsys):
    records = '1\t{"type": "system"}\n2\t{"type": "result"}\nexit\t{"code": 0}\n'
    (tmp_path / "t1.log").write_text(records)
    assert attach(tmp_path, "t1", capsys) == (0, records)


def test_attach_follows_a_running_turn_until_its_exit_record(tmp_path, capsys):
    log = tmp_path / "t2.log"
    log.write_text('1\t{"type": "system"}\n')
    # A stand-in for `wrapper run --turn-id t2`: its command line names the turn and `run`.
    runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "run", "t2"])
    (tmp_path / "t2.run.pid").write_text(str(runner.pid))

    def finish() -> None:
        time.sleep(0.3)
        with open(log, "a") as out:
            out.write('2\t{"type": "res')
            out.flush()
            time.sleep(0.2)  # the reader sees half a line and must wait for the rest
            out.write('ult"}\nexit\t{"code": 0}\n')
    writer = threading.Thread(target=finish)
    writer.start()
    try:
        code, out = attach(tmp_path, "t2", capsys)
    finally:
        runner.kill()
        writer.join()
    assert code == 0 and out == '1\t{"type": "system"}\n2\t{"type": "result"}\nexit\t{"code": 0}\n'


def test_attach_to_a_turn_whose_process_died_prints_what_there_is_and_exits_3(tmp_path, capsys):
    (tmp_path / "t3.log").write_text('1\t{"type": "system"}\n')
    (tmp_path / "t3.run.pid").write_text(str(os.getpid()))  # alive, but not this turn's `wrapper run`
    assert attach(tmp_path, "t3", capsys) == (3, '1\t{"type": "system"}\n')
    assert attach(tmp_path, "missing", capsys) == (3, "")


def test_old_turn_logs_are_pruned_and_recent_ones_kept(tmp_path):
    old = [tmp_path / name for name in ("old.log", "old.stderr", "old.cancel")]
    recent = [tmp_path / name for name in ("recent.log", "recent.stderr", "recent.run.pid")]
    week_ago = time.time() - wrapper.LOG_KEEP_SECONDS - 60
    for path in old + recent:
        path.write_text("x")
    for path in old + recent[2:]:
        os.utime(path, (week_ago, week_ago))
    wrapper.prune_old_logs(str(tmp_path))
    assert not any(path.exists() for path in old) and all(path.exists() for path in recent)


def test_logs_are_pruned_at_most_once_an_hour(tmp_path):
    assert wrapper.prune_due(str(tmp_path)) and not wrapper.prune_due(str(tmp_path))
    hour_ago = time.time() - wrapper.PRUNE_EVERY_SECONDS - 1
    os.utime(tmp_path / ".pruned", (hour_ago, hour_ago))
    assert wrapper.prune_due(str(tmp_path))


def test_a_conversation_with_a_transcript_is_resumed_not_started_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_args(["run", "--turn-id", "t", "--session-id", "abc"])
    wrapper.prepare_conversation(args)
    assert wrapper.claude_command(args)[6:8] == ["--session-id", "abc"]
    (tmp_path / ".claude" / "projects" / "-workspace").mkdir(parents=True)
    stub = tmp_path / ".claude" / "projects" / "-workspace" / "abc.jsonl"
    # Killed before its first message: no conversation to resume, so it starts again (and the stub goes).
    stub.write_text('{"type": "queue-operation", "operation": "enqueue"}\n{"type": "user", "mess')
    args = parse_args(["run", "--turn-id", "t", "--session-id", "abc"])
    wrapper.prepare_conversation(args)
    assert wrapper.claude_command(args)[6:8] == ["--session-id", "abc"] and not stub.exists()
    stub.write_text('{"type": "user", "message": {"role": "user", "content": "hi"}}\n')
    args = parse_args(["run", "--turn-id", "t", "--session-id", "abc"])
    wrapper.prepare_conversation(args)
    assert wrapper.claude_command(args)[6:8] == ["--resume", "abc"]


def test_attach_keeps_a_carriage_return_inside_its_record(tmp_path, capsys):
    records = '1\t{"type": "assistant", "text": "a\rb"}\nexit\t{"code": 0}\n'
    (tmp_path / "t4.log").write_text(records, newline="")
    assert attach(tmp_path, "t4", capsys) == (0, records)


def test_a_transcript_cut_mid_line_is_repaired_before_resuming(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    project = tmp_path / ".claude" / "projects" / "-workspace"
    project.mkdir(parents=True)
    whole, cut = project / "whole.jsonl", project / "cut.jsonl"
    whole.write_text('{"a": 1}\n{"b": 2}\n')
    cut.write_text('{"a": 1}\n{"b": 2}\n{"c": ')
    for session_id in ("whole", "cut"):
        wrapper.prepare_conversation(parse_args(["run", "--turn-id", "t", "--resume", session_id]))
    assert whole.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert cut.read_text() == '{"a": 1}\n{"b": 2}\n'


# `wrapper run` itself, as the worker runs it, against small stand-ins for Claude Code.

ROOT = Path(__file__).resolve().parent.parent
EXIT_KEYS = {"code", "timed_out", "cancelled", "oom_killed", "lines", "stderr"}


def fake_claude(tmp_path: Path, body: str) -> Path:
    """A stand-in for Claude Code: a shell script with `body`."""
    path = tmp_path / "claude"
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def wrapper_argv(tmp_path: Path, *flags: str, command: str = "run", turn_id: str = "t1") -> list[str]:
    # The worker's own command line (workers/runtime.WRAPPER), with this interpreter for the container's.
    argv = [sys.executable, *WRAPPER[1:], command, "--turn-id", turn_id, "--log-dir", str(tmp_path / "turns")]
    if command == "run":
        argv += ["--session-id", "c1", "--claude", str(tmp_path / "claude")]
    return argv + list(flags)


def wrapper_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCD_")}
    env.update(extra, PYTHONPATH=str(ROOT), HOME=str(tmp_path))  # HOME: the transcripts it looks for
    return env


def run_wrapper(tmp_path: Path, *flags: str, prompt: bytes = b"hi", timeout: float = 10,
                **env: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]], dict]:
    """Runs a turn to its end: the process, its records as (tag, text), and its exit record."""
    done = subprocess.run(wrapper_argv(tmp_path, *flags), env=wrapper_env(tmp_path, **env), input=prompt,
                          capture_output=True, timeout=timeout)
    records = records_of(done.stdout)
    assert records and records[-1][0] == "exit", done
    exit_record = json.loads(records[-1][1])
    assert set(exit_record) == EXIT_KEYS
    return done, records, exit_record


def records_of(output: bytes) -> list[tuple[str, str]]:
    assert output.endswith(b"\n"), output
    return [tuple(line.split("\t", 1)) for line in output.decode().split("\n")[:-1]]


def test_run_numbers_each_line_and_ends_with_the_exit_record_in_stdout_and_log(tmp_path):
    fake_claude(tmp_path, 'cat >/dev/null\necho \'{"type": "system"}\'\necho \'{"type": "result"}\'\n'
                          'echo oops >&2\nexit 0\n')
    done, records, exit_record = run_wrapper(tmp_path)
    assert done.returncode == 0
    assert records[:-1] == [("1", '{"type": "system"}'), ("2", '{"type": "result"}')]
    assert exit_record == {"code": 0, "timed_out": False, "cancelled": False, "oom_killed": False, "lines": 2,
                           "stderr": "oops\n"}
    assert (tmp_path / "turns" / "t1.log").read_bytes() == done.stdout
    # What is left of the turn: its log only (and the time of the last prune).
    assert sorted(p.name for p in (tmp_path / "turns").iterdir()) == [".pruned", "t1.log"]


def test_run_passes_claude_its_arguments_and_the_prompt(tmp_path):
    fake_claude(tmp_path, 'printf "%s|" "$@"; echo\nwc -c\n')
    prompt = b"x" * 300_000  # more than a pipe holds: fed as Claude Code reads it
    _, records, exit_record = run_wrapper(tmp_path, "--model", "m1", "--allowed-tools", "Bash,Read",
                                          "--append-system-prompt", "-be brief", prompt=prompt)
    args = records[0][1].split("|")[:-1]
    assert args == ["-p", "--output-format", "stream-json", "--verbose", "--include-partial-messages",
                    "--session-id", "c1", "--model", "m1", "--allowedTools", "Bash,Read",
                    "--append-system-prompt", "-be brief"]
    assert records[1] == ("2", "300000") and exit_record["lines"] == 2


def test_run_skips_empty_lines_strips_line_ends_and_replaces_invalid_utf8(tmp_path):
    fake_claude(tmp_path, r"cat >/dev/null; printf 'a\r\n\n\r\n\nb\377c\r\r\n\tx y\nno end'" + "\n")
    done, records, exit_record = run_wrapper(tmp_path)
    assert records[:-1] == [("1", "a"), ("2", "b\ufffdc"), ("3", "\tx y"), ("4", "no end")]
    assert exit_record["lines"] == 4 and exit_record["code"] == 0
    assert (tmp_path / "turns" / "t1.log").read_bytes() == done.stdout


def test_a_claude_that_exits_without_reading_its_prompt_still_gets_an_exit_record(tmp_path):
    fake_claude(tmp_path, "echo 'no such model' >&2\nexit 3\n")
    started = time.monotonic()
    done, records, exit_record = run_wrapper(tmp_path, "--timeout", "60", prompt=b"p" * (1 << 20))
    assert time.monotonic() - started < 5  # not the timeout
    assert records == [records[-1]]
    assert exit_record["code"] == 3 and exit_record["stderr"] == "no such model\n"
    assert done.returncode == 3


def test_the_exit_record_carries_the_tail_of_a_long_stderr(tmp_path):
    fake_claude(tmp_path, "cat >/dev/null\nhead -c 100000 /dev/zero | tr '\\0' a >&2\necho é-end >&2\nexit 1\n")
    _, _, exit_record = run_wrapper(tmp_path)
    stderr = exit_record["stderr"]
    assert len(stderr) == wrapper.STDERR_TAIL and stderr.endswith("aé-end\n")
    assert not (tmp_path / "turns" / "t1.stderr").exists()


def test_a_missing_claude_is_exit_code_127(tmp_path):
    done, records, exit_record = run_wrapper(tmp_path, "--claude", str(tmp_path / "missing"))
    assert exit_record["code"] == 127 and "No such file" in exit_record["stderr"] and len(records) == 1


@pytest.mark.parametrize("ignored, code", [("INT", -15), ("INT TERM", -9)])
def test_a_turn_past_its_timeout_is_interrupted_then_terminated_then_killed(tmp_path, ignored, code):
    fake_claude(tmp_path, f"trap '' {ignored}\ncat >/dev/null\necho '{{\"type\": \"system\"}}'\nexec sleep 30\n")
    timeout, grace = 0.5, 0.3
    started = time.monotonic()
    _, records, exit_record = run_wrapper(tmp_path, "--timeout", str(timeout), "--grace", str(grace))
    took = time.monotonic() - started
    signals_ignored = len(ignored.split())
    assert timeout + signals_ignored * grace <= took < timeout + signals_ignored * grace + 3
    assert exit_record["timed_out"] is True and exit_record["code"] == code and exit_record["cancelled"] is False
    assert records[0] == ("1", '{"type": "system"}') and exit_record["lines"] == 1


def start_turn(tmp_path: Path, **popen) -> subprocess.Popen:
    """Starts a turn whose Claude Code prints one line and then waits; returns once that line is out."""
    proc = subprocess.Popen(wrapper_argv(tmp_path, "--grace", "1"), env=wrapper_env(tmp_path),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, **popen)
    proc.stdin.write(b"hi")
    proc.stdin.close()
    proc.stdin = None  # so that communicate() does not flush it
    assert proc.stdout.readline() == b'1\t{"type": "system"}\n'
    return proc


def test_wrapper_cancel_stops_a_running_turn(tmp_path):
    fake_claude(tmp_path, "cat >/dev/null\necho '{\"type\": \"system\"}'\nexec sleep 30\n")
    proc = start_turn(tmp_path)
    try:
        started = time.monotonic()
        cancel = subprocess.run(wrapper_argv(tmp_path, command="cancel"), env=wrapper_env(tmp_path), timeout=10)
        rest = proc.communicate(timeout=10)[0]
    finally:
        proc.kill()
    assert cancel.returncode == 0 and time.monotonic() - started < 2  # the interrupt was enough
    exit_record = json.loads(records_of(rest)[-1][1])
    assert exit_record["cancelled"] is True and exit_record["code"] == -2 and exit_record["timed_out"] is False


def test_a_new_turn_stops_a_leftover_turn_first(tmp_path):
    fake_claude(tmp_path, "cat >/dev/null\necho '{\"type\": \"system\"}'\nexec sleep 30\n")
    leftover = start_turn(tmp_path)
    try:
        fake_claude(tmp_path, "cat >/dev/null\necho '{\"type\": \"result\"}'\n")
        done = subprocess.run(wrapper_argv(tmp_path, turn_id="t2"), env=wrapper_env(tmp_path), input=b"hi",
                              capture_output=True, timeout=10)
        stopped = json.loads(records_of(leftover.communicate(timeout=5)[0])[-1][1])
    finally:
        leftover.kill()
    assert stopped["cancelled"] is True and stopped["code"] == -2
    assert records_of(done.stdout)[0] == ("1", '{"type": "result"}')


def test_sigterm_to_the_wrapper_stops_the_turn_with_an_exit_record(tmp_path):
    fake_claude(tmp_path, "cat >/dev/null\necho '{\"type\": \"system\"}'\nexec sleep 30\n")
    proc = start_turn(tmp_path)
    try:
        proc.terminate()
        rest = proc.communicate(timeout=10)[0]
    finally:
        proc.kill()
    exit_record = json.loads(records_of(rest)[-1][1])
    assert exit_record["code"] == -2 and exit_record["cancelled"] is False and exit_record["lines"] == 1


def test_a_lost_stdout_is_ignored_and_the_log_goes_on(tmp_path):
    go = tmp_path / "go"
    fake_claude(tmp_path, f"cat >/dev/null\necho '{{\"type\": \"system\"}}'\n"
                          f"while [ ! -e {go} ]; do sleep 0.01; done\n"
                          "for i in $(seq 2 50); do echo \"line $i\"; done\n")
    proc = start_turn(tmp_path, stderr=subprocess.PIPE)
    proc.stdout.close()  # the worker went away
    go.touch()
    try:
        assert proc.wait(timeout=10) == 0, proc.stderr.read()
    finally:
        proc.kill()
    records = records_of((tmp_path / "turns" / "t1.log").read_bytes())
    assert [tag for tag, _ in records] == [str(n) for n in range(1, 51)] + ["exit"]
    assert records[-2] == ("50", "line 50") and json.loads(records[-1][1])["lines"] == 50


def test_the_mcp_config_exists_while_the_turn_runs_and_is_deleted_after(tmp_path):
    fake_claude(tmp_path, 'cat >/dev/null\nwhile [ $# -gt 0 ]; do [ "$1" = --mcp-config ] && cat "$2" && echo; '
                          'shift; done\n')
    _, records, exit_record = run_wrapper(tmp_path, CCD_API_URL="http://api", CCD_SESSION_TOKEN="secret")
    config = json.loads(records[0][1])
    assert config["mcpServers"]["ccd"]["env"]["CCD_SESSION_TOKEN"] == "secret"
    assert config["mcpServers"]["ccd"]["env"]["PYTHONPATH"] == str(ROOT)
    assert exit_record["code"] == 0 and not (tmp_path / "turns" / "t1.mcp.json").exists()


def test_a_failing_wrapper_still_stops_claude_and_writes_the_exit_record(tmp_path):
    fake_claude(tmp_path, "echo $$ > \"$0.pid\"\ncat >/dev/null\necho '{\"type\": \"system\"}'\nexec sleep 30\n")
    # A bug in the wrapper, the moment it reads Claude Code's output.
    code = ("import sys, wrapper.run as w\n"
            "from wrapper.__main__ import main\n"
            "def broken(self, lines): raise RuntimeError('bug')\n"
            "w.Turn.record_lines = broken\n"
            "sys.exit(main(sys.argv[1:]))\n")
    argv = wrapper_argv(tmp_path, "--grace", "1")
    done = subprocess.run([sys.executable, "-S", "-c", code, *argv[len(WRAPPER):]], env=wrapper_env(tmp_path),
                          input=b"hi", capture_output=True, timeout=10)
    exit_record = json.loads(records_of(done.stdout)[-1][1])
    assert exit_record["code"] == -2 and exit_record["stderr"].endswith("wrapper: RuntimeError: bug")
    assert not pid_alive(int((tmp_path / "claude.pid").read_text()))


def test_run_refuses_a_bad_command_line_as_argparse_would(capsys):
    for argv, message in [(["run", "--session-id", "c"], "the following arguments are required: --turn-id"),
                          (["run", "--turn-id", "t"], "one of the arguments --session-id --resume is required"),
                          (["run", "--turn-id", "t", "--resume", "a", "--session-id", "b"], "not allowed with"),
                          (["run", "--turn-id", "t", "--resume", "a", "--colour"], "unrecognized arguments: --colour"),
                          (["run", "--turn-id", "t", "--resume"], "argument --resume: expected one argument"),
                          (["run", "--turn-id", "t", "--resume", "a", "--timeout", "x"], "invalid float value"),
                          (["attach", "--turn-id", "t", "--grace", "1"], "unrecognized arguments: --grace"),
                          (["start"], "choose a command"), ([], "a command is required")]:
        with pytest.raises(SystemExit) as stopped:
            parse_args(argv)
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith("usage: wrapper") and message in err, (argv, err)
    args = parse_args(["run", "--turn-id=t", "--resume", "r", "--timeout", "7"])
    assert (args.turn_id, args.resume, args.session_id, args.timeout, args.grace) == ("t", "r", None, 7.0, 5.0)


def test_the_exit_record_is_the_json_that_json_dumps_writes():
    record = {"code": -9, "timed_out": True, "cancelled": False, "oom_killed": False, "lines": 0,
              "stderr": 'a"b\\c\n\r\t\x00\x1f\x7f é \u2028 😀 \ufffd', "more": [None, "x", {"y": 1}]}
    assert wrapper.to_json(record) == json.dumps(record)


def test_a_stdout_nobody_reads_is_given_up_on_after_the_stall_bound():
    read_end, write_end = os.pipe()
    try:
        os.set_blocking(write_end, False)
        started = time.monotonic()
        wrapper.write_all(write_end, b"x" * 10, 0.2)  # room in the pipe: written at once
        with pytest.raises(TimeoutError):
            wrapper.write_all(write_end, b"x" * (1 << 20), 0.2)  # more than a pipe holds, and nobody reads
        assert time.monotonic() - started < 5
        assert os.read(read_end, 10) == b"x" * 10
    finally:
        os.close(read_end)
        os.close(write_end)
