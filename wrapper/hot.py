"""The session's hot Claude Code process and the turns it runs, for `wrapper serve` (which owns both).

One `claude -p --input-format stream-json --output-format stream-json ...` stays alive between turns; each
turn is one user message on its stdin and ends at its `result` line. The control protocol is the Claude Agent
SDK's: an `initialize` request when the process starts, `interrupt` to stop a turn, and (with
`--permission-prompt-tool stdio`) `can_use_tool` requests that wait for a `control_response`.

A turn's records are what `wrapper run` writes (wrapper/run.py): its lines numbered, to stdout and to the turn
log, then an exit record. Claude Code's `control_request` and `control_cancel_request` lines are recorded too (the
worker turns them into approval events); its `control_response` lines answer our own requests and are not.
"""
import _signal
import json
import os
import time
import uuid

from wrapper.common import STOP_SIGNALS, Args, turn_base
from wrapper.run import (MCP_TOOLS_RULE, STDERR_TAIL, STDOUT_STALL_SECONDS, oom_kills, prepare_conversation,
                         remove, stderr_tail, write_all, write_mcp_config, write_text)

READ_SIZE = 1 << 16
# The env values that change every turn without needing a new process (the model credential is the process's own,
# minted for it; the session token reaches the MCP server through a file).
PER_TURN_ENV = ("ANTHROPIC_API_KEY", "CCD_SESSION_TOKEN", "CCD_PROCESS_ID")
PROCESS_STDERR = "process.stderr"
TOKEN_FILE = "session-token"
INTERRUPTED = "interrupt"


def hot_command(args: Args, mcp_config: str | None) -> list[str]:
    """Claude Code's command line for a long-lived process with this turn's flags."""
    # --replay-user-messages: Claude Code says when it starts and ends each message (command_lifecycle lines naming
    # the message's uuid), so a turn's lines are told from a late line of the one before it, and from a result
    # line the agent's own tools could forge.
    cmd = [args.claude, "-p", "--input-format", "stream-json", "--output-format", "stream-json", "--verbose",
           "--include-partial-messages", "--replay-user-messages"]
    cmd += ["--session-id", args.session_id] if args.session_id else ["--resume", args.resume]
    if args.model:
        cmd += ["--model", args.model]
    if mcp_config:
        cmd += ["--mcp-config", mcp_config]
    allowed = [rule for rule in [args.allowed_tools, MCP_TOOLS_RULE if mcp_config else None] if rule]
    if allowed:
        cmd += ["--allowedTools", ",".join(allowed)]
    if args.approvals == "ask":
        cmd += ["--permission-prompt-tool", "stdio"]
    if args.permission_mode:
        cmd += ["--permission-mode", args.permission_mode]
    if args.append_system_prompt:
        cmd += ["--append-system-prompt", args.append_system_prompt]
    return cmd


def process_key(args: Args, env: dict) -> tuple:
    """What a process was started with that a turn must match to run in it: its flags, its conversation, and the
    environment apart from the per-turn credentials."""
    flags = (args.model, args.allowed_tools, args.approvals, args.permission_mode, args.append_system_prompt)
    return flags, args.session_id or args.resume, tuple(sorted((k, v) for k, v in env.items()
                                                               if k not in PER_TURN_ENV))


class Process:
    """One Claude Code process: its pipes, what it is owed on stdin, and its control requests."""

    def __init__(self, key: tuple, process_id: str, log_dir: str) -> None:
        self.key, self.process_id, self.log_dir = key, process_id, log_dir
        self.pid: int | None = None
        self.code: int | None = None
        self.in_fd: int | None = None
        self.out_fd: int | None = None
        self.outbox = bytearray()
        self.pending = bytearray()
        self.turns = 0
        self.cost = 0.0  # the cumulative total_cost_usd of its last result line
        self.idle_since = time.monotonic()
        self.mcp_config: str | None = None
        self.requests = 0
        self.kill_step: int | None = None  # while being ended: the next of STOP_SIGNALS
        self.kill_at = 0.0
        self.lifecycle = False  # it has said when it starts and ends a message (command_lifecycle)

    def start(self, command: list[str], env: dict) -> None:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        stderr_path = os.path.join(self.log_dir, PROCESS_STDERR)
        try:
            # Its own process group, so a stop reaches the tools it started; SIGPIPE and SIGXFSZ back to defaults.
            self.pid = os.posix_spawnp(command[0], command, env, setsid=True,
                                       setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ),
                                       file_actions=[(os.POSIX_SPAWN_DUP2, in_r, 0),
                                                     (os.POSIX_SPAWN_DUP2, out_w, 1),
                                                     (os.POSIX_SPAWN_OPEN, 2, stderr_path,
                                                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)])
        finally:
            os.close(in_r)
            os.close(out_w)
        self.in_fd, self.out_fd = in_w, out_r
        os.set_blocking(in_w, False)
        self.control({"subtype": "initialize", "hooks": None})

    def send(self, message: dict) -> None:
        """Queues one JSON line for Claude Code's stdin (written as it reads: a prompt may exceed a pipe)."""
        if self.in_fd is not None:
            self.outbox += json.dumps(message).encode() + b"\n"
            self.flush()

    def control(self, request: dict) -> str:
        """Sends a control request of ours; its id."""
        self.requests += 1
        request_id = f"ccd-{self.requests}"
        self.send({"type": "control_request", "request_id": request_id, "request": request})
        return request_id

    def flush(self) -> None:
        try:
            while self.outbox:
                del self.outbox[:os.write(self.in_fd, self.outbox)]
        except BlockingIOError:
            pass
        except OSError:  # it closed its stdin or exited: nothing more reaches it
            self.outbox.clear()

    def close_stdin(self) -> None:
        """Ends its input: Claude Code exits once it has answered what it has."""
        if self.in_fd is not None:
            os.close(self.in_fd)
            self.in_fd = None
            self.outbox.clear()

    def read_lines(self) -> list[bytes] | None:
        """The whole lines readable now; None at the end of its output (the rest of a cut line comes last)."""
        chunk = os.read(self.out_fd, READ_SIZE)
        if not chunk:
            rest = [bytes(self.pending)] if self.pending else []
            self.pending = bytearray()
            os.close(self.out_fd)
            self.out_fd = None
            return rest or None
        cut = chunk.rfind(b"\n")
        if cut < 0:
            self.pending += chunk
            return []
        text = bytes(self.pending) + chunk[:cut] if self.pending else chunk[:cut]
        self.pending = bytearray(chunk[cut + 1:])
        return text.split(b"\n")

    def reaped(self) -> bool:
        """Whether it has ended (never waits)."""
        if self.code is None and self.pid is not None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                pid, status = self.pid, 0
            if pid:
                self.code = os.waitstatus_to_exitcode(status)
        return self.code is not None

    def gone(self) -> bool:
        return self.out_fd is None and self.reaped()

    def end(self, now: float, grace: float) -> None:
        """Starts ending it: its input closed, then the stop signals `grace` apart until it is gone."""
        self.close_stdin()
        if self.kill_step is None:
            self.kill_step, self.kill_at = 0, now + grace

    def escalate(self, now: float, grace: float) -> None:
        """The next stop signal to its group, when it is due."""
        if self.kill_step is None or now < self.kill_at or self.reaped():
            return
        if self.kill_step < len(STOP_SIGNALS):
            try:
                os.killpg(self.pid, STOP_SIGNALS[self.kill_step])
            except ProcessLookupError:
                pass
            self.kill_step += 1
            self.kill_at = now + grace
        elif self.out_fd is not None:  # killed, yet its output is held open (a process outside the group)
            os.close(self.out_fd)
            self.out_fd = None

    def stderr_tail(self) -> str:
        return stderr_tail(os.path.join(self.log_dir, PROCESS_STDERR))

    def cleanup(self) -> None:
        for fd in (self.in_fd, self.out_fd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.in_fd = self.out_fd = None
        if self.mcp_config:
            remove(self.mcp_config)


class HotTurn:
    """One turn in the hot process: its log, its numbering, its clock (stopped while a permission prompt waits
    for an answer), its stop, and its exit record."""

    def __init__(self, args: Args, nonce: str, process: Process) -> None:
        self.args, self.nonce, self.process = args, nonce, process
        self.base = turn_base(args.log_dir, args.turn_id)
        self.log_fd: int | None = None
        self.stdout_ok = True
        self.lines = 0
        self.started = time.monotonic()
        self.used = 0.0  # seconds of its timeout spent, up to `running_since`
        self.running_since: float | None = self.started  # None while a prompt waits for an answer
        self.asking: set[str] = set()  # Claude Code's permission prompts waiting for an answer
        self.timed_out = False
        self.cancelled = False
        self.stop_at: float | None = None  # when the stop escalates to signals (after an interrupt)
        self.result: dict | None = None
        self.message_uuid = str(uuid.uuid4())  # Claude Code's lifecycle lines name the turn's message by it
        self.began = False  # Claude Code said it started the turn's message
        self.ended = False  # it said it finished (or cancelled) it; else the result line ends the turn
        self.ooms_before = oom_kills()
        self.cost_before = process.cost

    def open(self) -> None:
        self.log_fd = os.open(f"{self.base}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
        write_text(f"{self.base}.run.pid", str(os.getpid()))
        write_text(f"{self.base}.pid", str(self.process.pid))

    def deadline(self) -> float | None:
        """When its timeout runs out; None while the clock is stopped."""
        if self.running_since is None:
            return None
        return self.running_since + max(0.0, self.args.timeout - self.used)

    def take(self, lines: list[bytes]) -> list[bytes]:
        """Records Claude Code's lines until the turn is over; notes the result line, its permission prompts, and the
        turn's end. The lines read after its end are no longer the turn's: they are returned."""
        records = []
        for i, line in enumerate(lines):
            if self.over():
                lines = lines[i:]
                break
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            kind = line_type(line)
            if kind == b"control_response":
                continue  # the answer to our initialize or interrupt
            if kind == b"command_lifecycle":
                self.lifecycle(line)
                continue
            if kind == b"user" and b'"isReplay":true' in line:
                continue  # the turn's own prompt, echoed (--replay-user-messages)
            if self.process.lifecycle and not self.began:
                continue  # a late line of the turn before (its message had ended), or one no message owns
            if kind in (b"control_request", b"control_cancel_request", b"result"):
                self.note(kind, line)
            self.lines += 1
            records.append(b"%d\t%s\n" % (self.lines, line))
        else:
            lines = []
        if records:
            self.record(b"".join(records).decode("utf-8", "replace").encode())
        return lines

    def lifecycle(self, line: bytes) -> None:
        """Claude Code's word on a message: started, then completed or cancelled. Only this turn's count."""
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("command_uuid") != self.message_uuid:
            return
        self.process.lifecycle = True
        state = message.get("state")
        if state == "started":
            self.began = True
        elif state in ("completed", "cancelled"):
            self.began = self.ended = True

    def over(self) -> bool:
        """Whether the turn has ended: Claude Code finished its message (or, from a Claude Code that does not say
        so, printed a result line)."""
        return self.ended or (self.result is not None and not self.process.lifecycle)

    def note(self, kind: bytes, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            return
        if not isinstance(message, dict):
            return
        if kind == b"result":
            self.result = message
            cost = message.get("total_cost_usd")
            if isinstance(cost, (int, float)) and not isinstance(cost, bool):
                self.process.cost = float(cost)
            return
        request_id = message.get("request_id")
        if not isinstance(request_id, str):
            return
        if kind == b"control_request":
            if (message.get("request") or {}).get("subtype") == "can_use_tool":
                self.asking.add(request_id)
                self.pause()
        else:
            self.answered(request_id)

    def pause(self) -> None:
        if self.running_since is not None:
            now = time.monotonic()
            self.used += now - self.running_since
            self.running_since = None

    def answered(self, request_id: str) -> bool:
        """A prompt is no longer waiting (answered, or withdrawn by Claude Code); the clock runs again when none is."""
        if request_id not in self.asking:
            return False
        self.asking.discard(request_id)
        if not self.asking and self.running_since is None:
            self.running_since = time.monotonic()
        return True

    def answer(self, request_id: str, response: dict) -> bool:
        """Passes an answer to one of its prompts to Claude Code; False when it is not waiting for one."""
        if not self.answered(request_id):
            return False
        self.process.send({"type": "control_response",
                           "response": {"subtype": "success", "request_id": request_id, "response": response}})
        return True

    def interrupt(self, now: float, why: str) -> None:
        """Asks Claude Code to stop the turn (it ends it with a result line); signals follow after --grace.
        `why`: cancel, timeout, or superseded (a newer turn request came)."""
        self.cancelled = self.cancelled or why == "cancel"
        self.timed_out = self.timed_out or why == "timeout"
        if self.stop_at is None:
            self.process.control({"subtype": INTERRUPTED})
            self.stop_at = now + self.args.grace
            self.running_since = self.running_since or now  # a prompt's wait does not hold a stop back

    def record(self, data: bytes) -> None:
        """To the turn log, then stdout (a lost stdout is ignored: the log is what a new worker reads)."""
        if self.log_fd is not None:
            try:
                write_all(self.log_fd, data)
            except OSError:
                os.close(self.log_fd)
                self.log_fd = None
        if self.stdout_ok:
            try:
                write_all(1, data, STDOUT_STALL_SECONDS)
            except OSError:
                self.stdout_ok = False

    def finish(self, code: int | None, error: str | None = None) -> None:
        """Writes the exit record (as wrapper run's, plus the process it ran in) and removes the turn's files."""
        process = self.process
        stderr = "" if self.result is not None and code == 0 else process.stderr_tail()
        if error:
            stderr = (stderr + ("\n" if stderr else "") + error)[-STDERR_TAIL:]
        ooms_after = oom_kills() if self.ooms_before is not None else None
        # Ended during the turn without being stopped: killed from inside the container, or crashed.
        lost = self.result is None and self.stop_at is None and process.gone()
        record = {"code": code, "timed_out": self.timed_out, "process_lost": lost,
                  "cancelled": self.cancelled or os.path.exists(f"{self.base}.cancel"),
                  "oom_killed": ooms_after is not None and ooms_after > self.ooms_before,
                  "lines": self.lines, "stderr": stderr, "pid": process.pid, "process_id": process.process_id,
                  "process_turns": process.turns, "cost_before": self.cost_before}
        self.record(b"exit\t" + json.dumps(record).encode() + b"\n")
        if self.log_fd is not None:
            os.close(self.log_fd)
            self.log_fd = None
        for suffix in (".run.pid", ".pid", ".cancel"):
            remove(self.base + suffix)


def line_type(line: bytes) -> bytes | None:
    """The `type` of one of Claude Code's lines. Most start with `{"type":"…"`, read without parsing; the others
    (2.1.330 prints its result line with `type` further on) are parsed."""
    if line.startswith(b'{"type":"'):
        end = line.find(b'"', 9)
        if end > 0:
            return line[9:end]
    try:
        kind = json.loads(line).get("type")
    except (ValueError, AttributeError, RecursionError):
        return None
    return kind.encode() if isinstance(kind, str) else None


def new_process(args: Args, env: dict, key: tuple) -> Process:
    """Starts Claude Code for the session: the conversation made ready, the MCP server's config (its token in a
    file this renews every turn, so the server runs as long as the process)."""
    process = Process(key, env.get("CCD_PROCESS_ID", ""), args.log_dir)
    prepare_conversation(args)
    env = dict(env)
    if env.get("CCD_SESSION_TOKEN"):
        # The current token, for the MCP server and the agent's own tools alike: the one in the environment is the
        # first turn's, and expires with it.
        env["CCD_SESSION_TOKEN_FILE"] = renew_token(args.log_dir, env)
    process.mcp_config = write_mcp_config(env, os.path.join(args.log_dir, "process.mcp.json"))
    process.start(hot_command(args, process.mcp_config), {**os.environ, **env})
    return process


def renew_token(log_dir: str, env: dict) -> str:
    """Writes the turn's session token where the MCP server reads it; the file's path."""
    path = os.path.join(log_dir, TOKEN_FILE)
    if env.get("CCD_SESSION_TOKEN"):
        tmp = path + ".new"
        write_text(tmp, env["CCD_SESSION_TOKEN"], 0o600)
        os.replace(tmp, path)
    return path


def user_message(prompt: str, message_uuid: str) -> dict:
    """A turn's prompt as the Agent SDK's client writes it, with the uuid Claude Code's lifecycle lines name."""
    return {"type": "user", "message": {"role": "user", "content": prompt}, "parent_tool_use_id": None,
            "session_id": "default", "uuid": message_uuid}
