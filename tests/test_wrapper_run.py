"""The wrapper's re-attach side, run directly: following a turn log, a turn that died, old logs."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

from wrapper import run as wrapper


def attach(tmp_path, turn_id: str, capsys) -> tuple[int, str]:
    code = wrapper.attach_turn(argparse.Namespace(log_dir=str(tmp_path), turn_id=turn_id))
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
    old, recent = tmp_path / "old.log", tmp_path / "recent.log"
    old.write_text("x")
    recent.write_text("y")
    week_ago = time.time() - wrapper.LOG_KEEP_SECONDS - 60
    os.utime(old, (week_ago, week_ago))
    wrapper.prune_old_logs(tmp_path)
    assert not old.exists() and recent.exists()


def test_a_conversation_with_a_transcript_is_resumed_not_started_again(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    args = wrapper.parse_args(["run", "--turn-id", "t", "--session-id", "abc"])
    wrapper.prepare_conversation(args)
    assert wrapper.claude_command(args)[6:8] == ["--session-id", "abc"]
    (tmp_path / ".claude" / "projects" / "-workspace").mkdir(parents=True)
    stub = tmp_path / ".claude" / "projects" / "-workspace" / "abc.jsonl"
    # Killed before its first message: no conversation to resume, so it starts again (and the stub goes).
    stub.write_text('{"type": "queue-operation", "operation": "enqueue"}\n{"type": "user", "mess')
    args = wrapper.parse_args(["run", "--turn-id", "t", "--session-id", "abc"])
    wrapper.prepare_conversation(args)
    assert wrapper.claude_command(args)[6:8] == ["--session-id", "abc"] and not stub.exists()
    stub.write_text('{"type": "user", "message": {"role": "user", "content": "hi"}}\n')
    args = wrapper.parse_args(["run", "--turn-id", "t", "--session-id", "abc"])
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
        wrapper.prepare_conversation(wrapper.parse_args(["run", "--turn-id", "t", "--resume", session_id]))
    assert whole.read_text() == '{"a": 1}\n{"b": 2}\n'
    assert cut.read_text() == '{"a": 1}\n{"b": 2}\n'
