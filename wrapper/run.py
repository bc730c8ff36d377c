"""Runs one Claude Code turn: prompt from stdin, each output line numbered to stdout and a turn log.

Output protocol (read by workers/turn_runner.py), one record per line:
    <n>\t<line Claude Code printed>      n = 1, 2, 3 ... in the order printed
    exit\t{"code": .., "timed_out": .., "cancelled": .., "oom_killed": .., "lines": .., "stderr": ..}   always last
The same records go to <log-dir>/<turn-id>.log, so a worker that lost the stream can re-read them
with `wrapper attach` (wrapper/attach.py) for a week: older logs are deleted by a later turn, which
looks at most once an hour. The turn's other files are listed in wrapper/common.py.
Empty lines are skipped, line ends (\r\n) stripped, invalid UTF-8 replaced; "stderr" is the tail of
what Claude Code wrote there (kept in <turn-id>.stderr while it runs). Each record is written as
soon as its line is read. Should the wrapper itself fail, the exit record still comes, its error
at the end of "stderr".

A turn past --timeout is stopped: interrupt, terminate, kill, --grace seconds apart, to Claude
Code's process group (so its tools go too); SIGTERM or SIGINT to the wrapper stops it the same way,
and `wrapper cancel` (wrapper/cancel.py) from a second `docker exec`.

When the environment has CCD_API_URL and CCD_SESSION_TOKEN, the turn also gets the "ccd" MCP
server (wrapper/mcp.py, tools to spawn and wait for child sessions): its config goes to
<log-dir>/<turn-id>.mcp.json (0600, it holds the token) for `--mcp-config`, `mcp__ccd` is added
to --allowedTools (so the tools need no approval), and the file is deleted when the turn ends.

This runs for every turn, so it imports only modules that cost next to nothing: no argparse,
subprocess, threading, pathlib or json (json imports re), and _signal rather than signal (enum).
The same goes for wrapper/common.py, the one module of its own it imports on every turn.
"""
import _signal
import os
import select
import sys
import time

try:
    from _json import encode_basestring_ascii as json_string
except ImportError:  # a Python built without the C accelerator
    from json.encoder import py_encode_basestring_ascii as json_string

from wrapper.common import STOP_SIGNALS, Args, stop_group, turn_base, turn_running

STDERR_TAIL = 4000
LOG_KEEP_SECONDS = 7 * 86400  # a turn log matters only while its turn may still be re-attached
PRUNE_EVERY_SECONDS = 3600  # pruning stats every log (~1 ms per 300): not on every turn
MCP_SERVER = "ccd"
MCP_TOOLS_RULE = f"mcp__{MCP_SERVER}"  # a permission rule naming a server allows all of its tools
READ_SIZE = 1 << 16
# A worker that stops reading (frozen, not gone) would block every write: past this, stdout is given up on, so the
# turn goes on in its log, where the worker that takes the turn over reads it.
STDOUT_STALL_SECONDS = 60.0


def to_json(value) -> str:
    """JSON text, as json.dumps writes it, for the few kinds of value the wrapper writes."""
    if isinstance(value, str):
        return json_string(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json_string(key)}: {to_json(item)}" for key, item in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(to_json, value)) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_text(path: str, text: str, mode: int = 0o666) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        write_all(fd, text.encode())
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes, stall_seconds: float | None = None) -> None:
    """Writes all of `data`; on a non-blocking fd, TimeoutError when the reader takes none of it for
    `stall_seconds`."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
            continue
        except BlockingIOError:
            pass
        if not select.select([], [fd], [], stall_seconds)[1]:
            raise TimeoutError(f"nothing read from fd {fd} for {stall_seconds:.0f} s")


def wake_on_signals() -> int:
    """A pipe that every handled signal writes to, a child's exit (SIGCHLD) included; its read end, for a select
    loop to wait on beside its other fds. SIGCHLD gets a handler, since its default is to be ignored."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    _signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    _signal.signal(_signal.SIGCHLD, lambda _signum, _frame: None)
    return wake_r


def drain(fd: int) -> None:
    """Reads a non-blocking pipe empty."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def claude_command(args: Args, mcp_config: str | None = None) -> list[str]:
    """The Claude Code command line for this turn; with `mcp_config`, the ccd tools are loaded and allowed."""
    cmd = [args.claude, "-p", "--output-format", "stream-json", "--verbose",
           "--include-partial-messages"]
    cmd += ["--session-id", args.session_id] if args.session_id else ["--resume", args.resume]
    if args.model:
        cmd += ["--model", args.model]
    if mcp_config:
        cmd += ["--mcp-config", mcp_config]
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


def transcripts(session_id: str) -> list[str]:
    """Where Claude Code keeps the conversation with this id (~/.claude/projects/<cwd>/<id>.jsonl)."""
    projects = os.path.join(os.path.expanduser("~"), ".claude", "projects")
    try:
        names = os.listdir(projects)
    except OSError:
        return []
    paths = (os.path.join(projects, name, f"{session_id}.jsonl") for name in names if not name.startswith("."))
    return [path for path in paths if os.path.lexists(path)]


def prepare_conversation(args: Args) -> None:
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
                remove(path)


def holds_a_message(path: str) -> bool:
    """Whether a transcript has at least one whole conversation entry (a user or assistant message)."""
    import json  # only here, after a lost turn: json costs every turn ~5 ms (it imports re)

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


def repair_transcript(path: str) -> None:
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


def write_mcp_config(env, path: str) -> str | None:
    """Writes the ccd MCP server's config for Claude Code when the env can reach the API; its path, or None."""
    if not (env.get("CCD_API_URL") and env.get("CCD_SESSION_TOKEN")):
        return None
    server_env = {name: env.get(name, "") for name in ("CCD_API_URL", "CCD_SESSION_TOKEN", "CCD_SESSION_ID")}
    if env.get("CCD_SESSION_TOKEN_FILE"):  # a hot process's server: the token is renewed in that file every turn
        server_env["CCD_SESSION_TOKEN_FILE"] = env["CCD_SESSION_TOKEN_FILE"]
        del server_env["CCD_SESSION_TOKEN"]
    # Where `wrapper` imports from.
    server_env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
    # -S -P: Claude Code starts it in the workspace, whose modules (a planted wrapper/, sitecustomize) must not load.
    # alwaysLoad: Claude Code (2.1.330) otherwise defers MCP tools behind its ToolSearch tool, so the
    # model sees only their names; it also makes Claude Code wait for the server before the first request.
    config = {"mcpServers": {MCP_SERVER: {"type": "stdio", "command": sys.executable or "python3",
                                          "args": ["-S", "-P", "-m", "wrapper", "mcp"], "env": server_env,
                                          "alwaysLoad": True}}}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_text(path, to_json(config), 0o600)  # 0600 whatever the umask: the file holds the session's token
    return path


def stop_leftover_turns(log_dir: str, grace: float) -> None:
    """Stops any other turn still running in this container (its worker was lost and it was given
    up on), so two turns never work on one conversation and workspace at once."""
    for name in os.listdir(log_dir):
        if name.endswith(".run.pid"):
            turn_id = name[: -len(".run.pid")]
            if turn_running(turn_base(log_dir, turn_id)):
                from wrapper.cancel import cancel_turn  # only here: a left-over turn is rare

                cancel_turn(Args("cancel", log_dir=log_dir, turn_id=turn_id, grace=grace))


def prune_due(log_dir: str) -> bool:
    """Whether PRUNE_EVERY_SECONDS have passed since the last prune (a stamp file's time); if so, restamps."""
    stamp = os.path.join(log_dir, ".pruned")
    try:
        if time.time() - os.stat(stamp).st_mtime < PRUNE_EVERY_SECONDS:
            return False
    except OSError:
        pass
    try:
        write_text(stamp, "")
    except OSError:
        return False
    return True


def prune_old_logs(log_dir: str, keep_seconds: float = LOG_KEEP_SECONDS) -> None:
    """Deletes turn logs nobody will re-attach to any more (and what a lost turn left beside them:
    its stderr, its cancel marker), so the home volume does not fill up."""
    cutoff = time.time() - keep_seconds
    try:
        names = os.listdir(log_dir)
    except OSError:
        return
    for name in names:
        if name.endswith((".log", ".stderr", ".cancel")):
            path = os.path.join(log_dir, name)
            try:
                if os.stat(path).st_mtime < cutoff:
                    os.unlink(path)
            except OSError:
                pass


def oom_kills() -> int | None:
    """How many processes the kernel killed for memory in this container so far (cgroup v2, else v1)."""
    for path in ("/sys/fs/cgroup/memory.events", "/sys/fs/cgroup/memory/memory.oom_control"):
        try:
            with open(path, "rb") as events:  # bytes: a text encoding other than UTF-8 is one more import
                for line in events:
                    key, _, value = line.partition(b" ")
                    if key == b"oom_kill":
                        return int(value)
        except (OSError, ValueError):
            continue
    return None


def stderr_tail(path: str) -> str:
    """The last STDERR_TAIL characters of a file (read from its end: it may be large)."""
    try:
        with open(path, "rb") as stderr:
            size = stderr.seek(0, os.SEEK_END)
            stderr.seek(max(0, size - 4 * STDERR_TAIL - 3))  # up to 4 bytes a character, 3 of a cut one
            data = stderr.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-STDERR_TAIL:]


class Turn:
    """One `wrapper run`: Claude Code's process, the loop that feeds its stdin and records its lines,
    the stop escalation, and the exit record.

    One thread and a select loop: the deadline, the stop signals' times, a SIGTERM to the wrapper and
    Claude Code's end all wake the same select (signals through a wake-up pipe), so nothing can keep
    the wrapper waiting after Claude Code is gone, and there is no thread to start.
    """

    def __init__(self, args: Args) -> None:
        self.args = args
        self.base = turn_base(args.log_dir, args.turn_id)
        self.cleanup: list[str] = []  # files this turn made, deleted after its exit record
        self.log_fd: int | None = None
        self.stdout_ok = True
        self.pid: int | None = None
        self.code: int | None = None  # Claude Code's exit code, once it was reaped
        self.lines = 0
        self.pending = bytearray()  # a line not yet ended by \n
        self.out_fd: int | None = None
        self.wake_fd: int | None = None
        self.in_fd: int | None = None
        self.prompt = memoryview(b"")
        self.timed_out = False
        self.stop_asked = False  # by SIGTERM or SIGINT
        self.stop_step: int | None = None  # index into STOP_SIGNALS of the next signal, while stopping
        self.stop_at = 0.0
        self.ooms_before: int | None = None
        self.error: str | None = None

    def prepare(self) -> None:
        """Everything before Claude Code starts: other turns stopped, pid and log files, the conversation,
        the MCP config; first of all the signals that stop the turn, so none is missed."""
        self.wake_fd = wake_on_signals()
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            _signal.signal(sig, self.on_stop_signal)
        os.makedirs(self.args.log_dir, exist_ok=True)
        stop_leftover_turns(self.args.log_dir, self.args.grace)
        write_text(f"{self.base}.run.pid", str(os.getpid()))
        self.cleanup.append(f"{self.base}.run.pid")
        self.log_fd = os.open(f"{self.base}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        prepare_conversation(self.args)
        mcp_config = write_mcp_config(os.environ, f"{self.base}.mcp.json")
        if mcp_config:
            self.cleanup.append(mcp_config)
        self.command = claude_command(self.args, mcp_config)

    def on_stop_signal(self, _signum, _frame) -> None:
        self.stop_asked = True

    def run(self) -> None:
        """Runs Claude Code on the prompt from stdin, recording its lines, until it is gone."""
        self.prompt = memoryview(sys.stdin.buffer.read())
        self.ooms_before = oom_kills()
        stderr_path = f"{self.base}.stderr"
        self.cleanup.append(stderr_path)
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        try:
            # Its own session and process group, so a cancel or timeout can signal Claude Code and its tools
            # at once; SIGPIPE and SIGXFSZ back to their defaults, which Python had set to ignore.
            self.pid = os.posix_spawnp(self.command[0], self.command, os.environ, setsid=True,
                                       setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),
                                       file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                                     (os.POSIX_SPAWN_DUP2, out_w, 1),
                                                     (os.POSIX_SPAWN_OPEN, 2, stderr_path,
                                                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)])
        except OSError as exc:
            for fd in (in_r, in_w, out_r, out_w):
                os.close(fd)
            self.code, self.error = 127, str(exc)
            return
        os.close(in_r)
        os.close(out_w)
        self.in_fd, self.out_fd = in_w, out_r
        os.set_blocking(in_w, False)  # a prompt larger than the pipe is fed as Claude Code reads it
        os.set_blocking(1, False)  # see write_all
        write_text(f"{self.base}.pid", str(self.pid))
        self.cleanup.append(f"{self.base}.pid")
        if os.path.exists(f"{self.base}.cancel"):  # cancelled before Claude Code started
            self.stop()
        self.pump()

    def pump(self) -> None:
        """Feeds the prompt and records lines until Claude Code's output has ended and it was reaped."""
        deadline = time.monotonic() + self.args.timeout
        if not self.prompt:
            self.close_stdin()
        while self.out_fd is not None or not self.reaped():
            now = time.monotonic()
            if self.stop_asked and self.stop_step is None:
                self.stop()
            if not self.timed_out and now >= deadline:
                self.timed_out = True
                if self.stop_step is None:
                    self.stop()
            if self.stop_step is not None and now >= self.stop_at:
                self.next_stop_step(now)
            wake_at = self.stop_at if self.stop_step is not None else None
            if not self.timed_out:
                wake_at = deadline if wake_at is None else min(wake_at, deadline)
            wait = None if wake_at is None else max(0.0, wake_at - now)
            readable = [self.wake_fd] if self.out_fd is None else [self.wake_fd, self.out_fd]
            writable = [] if self.in_fd is None else [self.in_fd]
            ready, can_write, _ = select.select(readable, writable, [], wait)
            if self.wake_fd in ready:
                drain(self.wake_fd)
            if can_write:
                self.feed()
            if self.out_fd is not None and self.out_fd in ready:
                self.read_output()

    def reaped(self) -> bool:
        """Whether Claude Code has ended (and its exit code is known); never waits."""
        if self.code is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code is not None

    def stop(self) -> None:
        self.stop_step, self.stop_at = 0, 0.0

    def next_stop_step(self, now: float) -> None:
        """Sends the next stop signal to Claude Code's group; after the kill and one more grace period,
        stops waiting for output that a process outside the group may be holding open."""
        if self.stop_step < len(STOP_SIGNALS):
            try:
                os.killpg(self.pid, STOP_SIGNALS[self.stop_step])
            except ProcessLookupError:
                pass  # the group is gone; its output ends by itself
            self.stop_step += 1
            self.stop_at = now + self.args.grace
        else:
            self.stop_step = None
            if self.out_fd is not None:
                self.end_output()

    def feed(self) -> None:
        """Writes as much of the prompt as the pipe takes; a Claude Code that stopped reading gets no more."""
        try:
            self.prompt = self.prompt[os.write(self.in_fd, self.prompt):]
        except BlockingIOError:
            return
        except OSError:  # BrokenPipeError: it exited (or closed stdin) before reading all of it
            self.prompt = memoryview(b"")
        if not self.prompt:
            self.close_stdin()

    def close_stdin(self) -> None:
        if self.in_fd is not None:
            os.close(self.in_fd)
            self.in_fd = None

    def read_output(self) -> None:
        chunk = os.read(self.out_fd, READ_SIZE)
        if not chunk:
            self.end_output()
            return
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self.pending += chunk
            return
        text = bytes(self.pending) + chunk[:cut] if self.pending else chunk[:cut]
        self.pending = bytearray(chunk[cut + 1:])
        self.record_lines(text.split(b"\n"))

    def end_output(self) -> None:
        """Claude Code's stdout ended (or is given up on): the last unended line, and no more prompt."""
        if self.pending:
            self.record_lines([bytes(self.pending)])
            self.pending = bytearray()
        os.close(self.out_fd)
        self.out_fd = None
        self.close_stdin()

    def record_lines(self, lines: list[bytes]) -> None:
        """Numbers the lines and writes them as one batch of records."""
        records = []
        for line in lines:
            line = line.rstrip(b"\r\n")
            if line:
                self.lines += 1
                records.append(b"%d\t%s\n" % (self.lines, line))
        if records:
            self.record(b"".join(records).decode("utf-8", "replace").encode())

    def record(self, data: bytes) -> None:
        """Writes records to the turn log, then to stdout, unbuffered.

        A lost stdout (the worker went away) is ignored: the log is what a new worker reads. A failing
        log (a full disk) is given up on, so that the worker still gets the turn.
        """
        if self.log_fd is not None:
            try:
                write_all(self.log_fd, data)
            except OSError:
                os.close(self.log_fd)
                self.log_fd = None
        if self.stdout_ok:
            try:
                write_all(1, data, STDOUT_STALL_SECONDS)
            except OSError:  # TimeoutError too
                self.stdout_ok = False

    def fail(self, exc: BaseException) -> None:
        """The wrapper itself failed: Claude Code is stopped, and the exit record will say why."""
        self.error = f"wrapper: {type(exc).__name__}: {exc}"
        if self.pid is not None and self.code is None:
            try:
                stop_group(self.pid, lambda: not self.reaped(), self.args.grace)
            except Exception:  # the exit record matters more
                pass
        if not self.code:
            self.code = 1

    def finish(self) -> None:
        """Writes the exit record, then deletes the turn's own files."""
        stderr = stderr_tail(f"{self.base}.stderr") if self.pid is not None else ""
        if self.error:
            stderr = (stderr + ("\n" if stderr else "") + self.error)[-STDERR_TAIL:]
        ooms_after = oom_kills() if self.ooms_before is not None else None
        oom = ooms_after is not None and ooms_after > self.ooms_before
        exit_record = {"code": self.code, "timed_out": self.timed_out,
                       "cancelled": os.path.exists(f"{self.base}.cancel"), "oom_killed": oom,
                       "lines": self.lines, "stderr": stderr}
        self.record(f"exit\t{to_json(exit_record)}\n".encode())
        if self.log_fd is not None:
            os.close(self.log_fd)
        for path in self.cleanup:
            try:
                remove(path)
            except OSError:
                pass


def run_turn(args: Args) -> int:
    """Runs the turn and returns Claude Code's exit code; the exit record comes whatever happens."""
    turn = Turn(args)
    try:
        turn.prepare()
        turn.run()
    except BaseException as exc:  # a bug, even a KeyboardInterrupt, still ends the turn with its record
        turn.fail(exc)
    turn.finish()
    if prune_due(args.log_dir):
        prune_old_logs(args.log_dir)  # after the exit record: the worker does not wait for this
    return turn.code
