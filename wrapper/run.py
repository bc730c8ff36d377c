"""Runs one Claude Code turn: prompt from stdin, each output line numbered to stdout and a turn log.

Output protocol (read by workers/turn_runner.py), one record per line:
    <n>\t<line Claude Code printed>      n = 1, 2, 3 ... in the order printed
    exit\t{"code": .., "timed_out": .., "cancelled": .., "stderr": ..}   always last
The same records go to <log-dir>/<turn-id>.log, so a worker that lost the stream can re-read them.

`wrapper attach --turn-id T` prints the turn log's records and follows it until the exit record,
for a worker that lost the stream (it was killed or restarted): the turn itself keeps running,
because a lost reader costs the wrapper nothing (stdout errors are ignored, the log goes on).
It exits 3 when the turn's process is gone without an exit record (the container restarted).

`wrapper cancel --turn-id T` stops a running turn from a second `docker exec`: it leaves a
marker (so the exit record says cancelled), then interrupts Claude Code's process group,
escalating to terminate and kill.

When the environment has CCD_API_URL and CCD_SESSION_TOKEN, the turn also gets the "ccd" MCP
server (wrapper/mcp.py, tools to spawn and wait for child sessions): its config goes to
<log-dir>/<turn-id>.mcp.json (0600, it holds the token) for `--mcp-config`, `mcp__ccd` is added
to --allowedTools (so the tools need no approval), and the file is deleted when the turn ends.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

STDERR_TAIL = 4000
ATTACH_POLL_SECONDS = 0.05
LOG_KEEP_SECONDS = 7 * 86400  # a turn log matters only while its turn may still be re-attached
DEFAULT_LOG_DIR = str(Path.home() / ".ccd" / "turns")
MCP_SERVER = "ccd"
MCP_TOOLS_RULE = f"mcp__{MCP_SERVER}"  # a permission rule naming a server allows all of its tools


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
    run.add_argument("--grace", type=float, default=5.0, help="seconds between stop signals")
    run.add_argument("--log-dir", default=DEFAULT_LOG_DIR)
    run.add_argument("--claude", default="claude")
    attach = sub.add_parser("attach", help="print a turn's records so far and follow until it exits")
    attach.add_argument("--turn-id", required=True)
    attach.add_argument("--log-dir", default=DEFAULT_LOG_DIR)
    cancel = sub.add_parser("cancel", help="stop a running turn: interrupt, terminate, kill")
    cancel.add_argument("--turn-id", required=True)
    cancel.add_argument("--grace", type=float, default=5.0, help="seconds between stop signals")
    cancel.add_argument("--log-dir", default=DEFAULT_LOG_DIR)
    return parser.parse_args(argv)


def claude_command(args: argparse.Namespace, mcp_config: Path | None = None) -> list[str]:
    """The Claude Code command line for this turn; with `mcp_config`, the ccd tools are loaded and allowed."""
    cmd = [args.claude, "-p", "--output-format", "stream-json", "--verbose",
           "--include-partial-messages"]
    cmd += ["--session-id", args.session_id] if args.session_id else ["--resume", args.resume]
    if args.model:
        cmd += ["--model", args.model]
    if mcp_config:
        cmd += ["--mcp-config", str(mcp_config)]
    # --allowedTools approves, it does not restrict: the ccd tools are approved even when no list was given,
    # because in -p mode a tool nobody approved is refused.
    allowed = [rule for rule in [args.allowed_tools, MCP_TOOLS_RULE if mcp_config else None] if rule]
    if allowed:
        cmd += ["--allowedTools", ",".join(allowed)]
    if args.permission_mode:
        cmd += ["--permission-mode", args.permission_mode]
    if args.append_system_prompt:
        cmd += ["--append-system-prompt", args.append_system_prompt]
    return cmd


def transcripts(session_id: str) -> list[Path]:
    """Where Claude Code keeps the conversation with this id (~/.claude/projects/<cwd>/<id>.jsonl)."""
    return list((Path.home() / ".claude" / "projects").glob(f"*/{session_id}.jsonl"))


def prepare_conversation(args: argparse.Namespace) -> None:
    """Makes the conversation ready to go on after a lost turn: its transcript's cut last line is
    dropped, and a new conversation whose id already has a transcript is resumed instead."""
    found = transcripts(args.resume or args.session_id)
    for path in found:
        repair_transcript(path)
    if args.session_id and found:
        if any(holds_a_message(path) for path in found):
            # An earlier turn started this conversation but its end was never recorded (its worker or
            # container was lost): continue it, since Claude Code refuses to start an id twice.
            args.session_id, args.resume = None, args.session_id
        else:
            # Killed before its first message was written: nothing to resume (Claude Code answers
            # "No conversation found"), so start the conversation afresh.
            for path in found:
                path.unlink(missing_ok=True)


def holds_a_message(path: Path) -> bool:
    """Whether a transcript has at least one whole conversation entry (a user or assistant message)."""
    try:
        with open(path, "rb") as transcript:
            for line in transcript:
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                if isinstance(entry, dict) and isinstance(entry.get("message"), dict):
                    return True
    except OSError:
        pass
    return False


def repair_transcript(path: Path) -> None:
    """Drops a last line cut short when Claude Code was killed mid-write (its container was killed),
    so the conversation resumes from its last whole entry."""
    try:
        with open(path, "rb+") as transcript:
            size = transcript.seek(0, os.SEEK_END)
            if size == 0:
                return
            transcript.seek(max(0, size - 1))
            if transcript.read(1) == b"\n":
                return
            start = max(0, size - (1 << 20))
            transcript.seek(start)
            tail = transcript.read()
            cut = tail.rfind(b"\n")
            transcript.truncate(start + cut + 1 if cut >= 0 else 0)
    except OSError:
        pass


def write_mcp_config(env: dict[str, str], path: Path) -> Path | None:
    """Writes the ccd MCP server's config for Claude Code when the env can reach the API; its path, or None."""
    if not (env.get("CCD_API_URL") and env.get("CCD_SESSION_TOKEN")):
        return None
    server_env = {name: env.get(name, "") for name in ("CCD_API_URL", "CCD_SESSION_TOKEN", "CCD_SESSION_ID")}
    server_env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)  # where `wrapper` imports from
    # alwaysLoad: Claude Code (2.1.330) otherwise defers MCP tools behind its ToolSearch tool, so the
    # model sees only their names; it also makes Claude Code wait for the server before the first request.
    config = {"mcpServers": {MCP_SERVER: {"type": "stdio", "command": sys.executable or "python3",
                                          "args": ["-S", "-m", "wrapper", "mcp"], "env": server_env,
                                          "alwaysLoad": True}}}
    path.parent.mkdir(parents=True, exist_ok=True)
    # 0600 whatever the umask: the file holds the session's token.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump(config, out)
    return path


class Recorder:
    """Writes each record to stdout and to the turn log, flushed, so no line waits in a buffer."""

    def __init__(self, log_path: Path) -> None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "w", encoding="utf-8")
        self._stdout_ok = True

    def write(self, tag: str, text: str) -> None:
        record = f"{tag}\t{text}\n"
        self._log.write(record)
        self._log.flush()
        if self._stdout_ok:
            try:
                sys.stdout.write(record)
                sys.stdout.flush()
            except (OSError, ValueError):  # the worker went away; the log is what a new one reads
                self._stdout_ok = False

    def close(self) -> None:
        self._log.close()


def stop_group(pgid: int, alive: Callable[[], bool], grace: float) -> None:
    """Ends a process group politely, then firmly: interrupt, terminate, kill, `grace` apart.

    The whole group, so the tools Claude Code started (a Bash command) go with it.
    """
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if not alive():
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its parent counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cancel_turn(args: argparse.Namespace) -> int:
    """Stops a running turn of this container; 0 when it is gone (or was never running)."""
    base = Path(args.log_dir) / args.turn_id
    Path(f"{base}.cancel").touch()
    try:
        pid = int(Path(f"{base}.pid").read_text())
    except (OSError, ValueError):
        return 0  # not started yet: the marker makes the wrapper stop as soon as it does
    stop_group(pid, lambda: pid_alive(pid), args.grace)
    return 0 if not pid_alive(pid) else 1


def turn_running(base: Path) -> bool:
    """True while the `wrapper run` of the turn at `base` is alive (checked by pid and command line,
    because after a container restart the recorded pid may belong to another process)."""
    try:
        pid = int(Path(f"{base}.run.pid").read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
    except (OSError, ValueError):
        return False
    return base.name.encode() in args and b"run" in args and pid_alive(pid)


def attach_turn(args: argparse.Namespace) -> int:
    """Prints the turn log's records and follows it; 0 after the exit record, 3 if the turn died without one."""
    base = Path(args.log_dir) / args.turn_id
    while True:
        try:
            # newline="\n": records end at \n only, exactly as the live stream splits them.
            log = open(f"{base}.log", encoding="utf-8", newline="\n")
            break
        except OSError:
            if not turn_running(base):
                return 3
            time.sleep(ATTACH_POLL_SECONDS)  # `wrapper run` is starting and has not opened its log yet
    partial, gone = "", False
    with log:
        while True:
            line = log.readline()
            if line:
                partial += line
                if not partial.endswith("\n"):
                    continue  # the writer is mid-line
                sys.stdout.write(partial)
                sys.stdout.flush()
                if partial.startswith("exit\t"):
                    return 0
                partial = ""
                continue
            if gone:
                return 3  # read to the end after the process was seen gone: no exit record is coming
            gone = not turn_running(base)
            if not gone:
                time.sleep(ATTACH_POLL_SECONDS)


def stop_leftover_turns(log_dir: Path, grace: float) -> None:
    """Stops any other turn still running in this container (its worker was lost and it was given
    up on), so two turns never work on one conversation and workspace at once."""
    for pid_file in log_dir.glob("*.run.pid"):
        base = log_dir / pid_file.name[: -len(".run.pid")]
        if turn_running(base):
            cancel_turn(argparse.Namespace(log_dir=str(log_dir), turn_id=base.name, grace=grace))


def prune_old_logs(log_dir: Path, keep_seconds: float = LOG_KEEP_SECONDS) -> None:
    """Deletes turn logs nobody will re-attach to any more, so the home volume does not fill up."""
    cutoff = time.time() - keep_seconds
    for path in log_dir.glob("*.log"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
        except OSError:
            pass


def oom_kills() -> int | None:
    """How many processes the kernel killed for memory in this container so far (cgroup v2, else v1)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path, encoding="ascii") as events:
                for line in events:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def run_turn(args: argparse.Namespace) -> int:
    """Runs the turn and returns Claude Code's exit code; the MCP config lives only as long as the turn."""
    base = Path(args.log_dir) / args.turn_id
    base.parent.mkdir(parents=True, exist_ok=True)
    stop_leftover_turns(base.parent, args.grace)
    prepare_conversation(args)
    prune_old_logs(base.parent)
    Path(f"{base}.run.pid").write_text(str(os.getpid()))
    mcp_config = write_mcp_config(dict(os.environ), Path(f"{base}.mcp.json"))
    try:
        return run_claude(args, base, mcp_config)
    finally:
        if mcp_config:
            mcp_config.unlink(missing_ok=True)
        Path(f"{base}.run.pid").unlink(missing_ok=True)


def run_claude(args: argparse.Namespace, base: Path, mcp_config: Path | None) -> int:
    """Runs Claude Code on the prompt from stdin, recording its lines; returns its exit code."""
    prompt = sys.stdin.buffer.read()
    ooms_before = oom_kills()
    recorder = Recorder(Path(f"{base}.log"))
    cancel_marker = Path(f"{base}.cancel")
    try:
        # Its own process group, so a cancel or timeout can signal Claude Code and its tools at once.
        proc = subprocess.Popen(claude_command(args, mcp_config), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, start_new_session=True)
    except OSError as exc:
        recorder.write("exit", json.dumps({"code": 127, "timed_out": False, "stderr": str(exc)}))
        recorder.close()
        return 127
    Path(f"{base}.pid").write_text(str(proc.pid))

    def stop(_signum=None, _frame=None) -> None:
        threading.Thread(target=stop_group, args=(proc.pid, lambda: proc.poll() is None, args.grace),
                         daemon=True).start()

    if cancel_marker.exists():  # cancelled before Claude Code started
        stop()
    stderr_chunks: list[bytes] = []
    drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
    drain.start()
    timed_out = threading.Event()

    def on_timeout() -> None:
        timed_out.set()
        stop()

    timer = threading.Timer(args.timeout, on_timeout)
    timer.start()
    signal.signal(signal.SIGTERM, stop)
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
    ooms_after = oom_kills()
    oom = ooms_before is not None and ooms_after is not None and ooms_after > ooms_before
    recorder.write("exit", json.dumps({"code": code, "timed_out": timed_out.is_set(),
                                       "cancelled": cancel_marker.exists(), "oom_killed": oom,
                                       "lines": n, "stderr": stderr}))
    recorder.close()
    Path(f"{base}.pid").unlink(missing_ok=True)
    return code


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.umask(0o077)
    commands = {"run": run_turn, "attach": attach_turn, "cancel": cancel_turn}
    return commands[args.command](args)
