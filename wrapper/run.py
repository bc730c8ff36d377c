"""Runs one Claude Code turn: prompt from stdin, each output line numbered to stdout and a turn log.

Output protocol (read by workers/turn_runner.py), one record per line:
    <n>\t<line Claude Code printed>      n = 1, 2, 3 ... in the order printed
    exit\t{"code": .., "timed_out": .., "stderr": ..}   always last
The same records go to <log-dir>/<turn-id>.log, so a worker that lost the stream can re-read them.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

STDERR_TAIL = 4000


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The wrapper's command line; the prompt itself never travels in argv."""
    parser = argparse.ArgumentParser(prog="wrapper")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one turn, prompt on stdin")
    run.add_argument("--turn-id", required=True)
    conv = run.add_mutually_exclusive_group(required=True)
    conv.add_argument("--session-id", help="start a new conversation with this id")
    conv.add_argument("--resume", help="continue the conversation with this id")
    run.add_argument("--model")
    run.add_argument("--allowed-tools", help="comma-separated tool names")
    run.add_argument("--permission-mode")
    run.add_argument("--append-system-prompt")
    run.add_argument("--timeout", type=float, default=3600.0)
    run.add_argument("--log-dir", default=str(Path.home() / ".ccd" / "turns"))
    run.add_argument("--claude", default="claude")
    return parser.parse_args(argv)


def claude_command(args: argparse.Namespace) -> list[str]:
    """The Claude Code command line for this turn."""
    cmd = [args.claude, "-p", "--output-format", "stream-json", "--verbose",
           "--include-partial-messages"]
    cmd += ["--session-id", args.session_id] if args.session_id else ["--resume", args.resume]
    if args.model:
        cmd += ["--model", args.model]
    if args.allowed_tools:
        cmd += ["--allowedTools", args.allowed_tools]
    if args.permission_mode:
        cmd += ["--permission-mode", args.permission_mode]
    if args.append_system_prompt:
        cmd += ["--append-system-prompt", args.append_system_prompt]
    return cmd


class Recorder:
    """Writes each record to stdout and to the turn log, flushed, so no line waits in a buffer."""

    def __init__(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w", encoding="utf-8")

    def write(self, tag: str, text: str) -> None:
        record = f"{tag}\t{text}\n"
        self._log.write(record)
        self._log.flush()
        sys.stdout.write(record)
        sys.stdout.flush()

    def close(self) -> None:
        self._log.close()


def stop(proc: subprocess.Popen) -> None:
    """Ends Claude Code politely, then firmly: interrupt, terminate, kill."""
    for sig, grace in ((signal.SIGINT, 5), (signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            continue


def run_turn(args: argparse.Namespace) -> int:
    """Runs the turn and returns Claude Code's exit code."""
    prompt = sys.stdin.buffer.read()
    recorder = Recorder(Path(args.log_dir) / f"{args.turn_id}.log")
    try:
        proc = subprocess.Popen(claude_command(args), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except OSError as exc:
        recorder.write("exit", json.dumps({"code": 127, "timed_out": False, "stderr": str(exc)}))
        recorder.close()
        return 127
    stderr_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        stop(proc)

    timer = threading.Timer(args.timeout, on_timeout)
    timer.start()
    signal.signal(signal.SIGTERM, lambda *_: stop(proc))
    proc.stdin.write(prompt)
    proc.stdin.close()
    n = 0
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if not line:
            continue
        n += 1
        recorder.write(str(n), line)
    code = proc.wait()
    timer.cancel()
    drain.join(5)
    stderr = b"".join(stderr_chunks).decode("utf-8", "replace")[-STDERR_TAIL:]
    recorder.write("exit", json.dumps({"code": code, "timed_out": timed_out.is_set(),
                                       "lines": n, "stderr": stderr}))
    recorder.close()
    return code


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.umask(0o077)
    return run_turn(args)
