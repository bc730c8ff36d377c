"""`wrapper serve`: the session container's main process (under Docker's init). It owns the session's hot Claude
Code process (wrapper/hot.py) and runs each turn in it when the worker asks on the container's stdin, through a
`docker attach`: a turn costs neither a `docker exec` (~60 ms of engine CPU; an attach costs about 3) nor, after
the first, a Claude Code start (~0.5 s and 0.7 CPU-s).

The worker writes one request per line, JSON. A turn:
    {"nonce": "...", "expires": <unix time>, "args": ["run", "--turn-id", ...], "env": {...}, "prompt": "..."}
or a control command for the running turn or the process:
    {"nonce": "...", "expires": ..., "control": "answer", "turn_id": "...", "request_id": "...", "response": {...}}
    {"nonce": "...", "expires": ..., "control": "interrupt", "turn_id": "..."}
    {"nonce": "...", "expires": ..., "control": "cool"}      end the hot process if no turn runs (the host's LRU)
and reads the container's stdout, where this writes marker lines around a turn's records (wrapper/hot.py):
    accepted\t<nonce>                 taken (the worker stops waiting for an answer)
    start\t<nonce>\t<process id>      the turn was started in that process (a new one, or the hot one)
    end\t<nonce>\t<code>              the turn ended, after its exit record
    stale\t<nonce>                    the request came after its expiry, and nothing was done
    done\t<nonce>\t<outcome>          a control command's answer: ok, unknown (no such turn or prompt), idle or
                                      busy (a cool with no process, or while a turn runs)

The process stays up `--hot` seconds after its turn (0: it ends with the turn), and is started again, with
`--resume`, when a turn needs other flags or it has ended. One turn at a time: a turn request that comes while
one runs (left over from a lost worker) interrupts that one first, as a cancel does. A request that arrives late
(written to a container that then stopped, and handed over after a restart) was given up on by its worker: it is
dropped, so a turn never runs twice that way.
"""
import _signal
import json
import os
import select
import sys
import time

from wrapper.common import Args, parse_args, turn_base
from wrapper.hot import HotTurn, Process, line_type, new_process, process_key, renew_token, user_message
from wrapper.run import drain, wake_on_signals, write_all

READ_SIZE = 1 << 16
CONTROLS = ("answer", "interrupt", "cool")


def say(*fields: str) -> None:
    """One marker line on stdout."""
    write_all(1, ("\t".join(fields) + "\n").encode())


def valid(request) -> bool:
    if not isinstance(request, dict) or not isinstance(request.get("nonce"), str) or not request["nonce"]:
        return False
    if not isinstance(request.get("expires"), (int, float)):
        return False
    if "control" in request:
        return request["control"] in CONTROLS and all(isinstance(request.get(k, ""), str)
                                                       for k in ("turn_id", "request_id"))
    args, env = request.get("args"), request.get("env", {})
    return (isinstance(args, list) and args[:1] == ["run"] and isinstance(env, dict)
            and isinstance(request.get("prompt", ""), str)
            and all(isinstance(item, str) for item in [*args, *env, *env.values()]))


class Server:
    def __init__(self) -> None:
        self.process: Process | None = None
        self.turn: HotTurn | None = None
        self.waiting: dict | None = None  # the turn request to start once the running one has ended
        self.ending: list[Process] = []  # processes told to stop, until they are gone
        self.hot_seconds = 0.0
        self.grace = 5.0

    # requests

    def take(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not valid(request):
            sys.stderr.write("wrapper serve: not a request; ignored\n")
            return
        if time.time() > request["expires"]:
            say("stale", request["nonce"])
            return
        if "control" in request:
            say("done", request["nonce"], self.control(request))
            return
        say("accepted", request["nonce"])
        if self.waiting is not None:  # superseded before it started, as a newer turn would have stopped it
            say("end", self.waiting["nonce"], str(-_signal.SIGTERM))
        self.waiting = request
        if self.turn is not None:
            self.turn.interrupt(time.monotonic(), "superseded")

    def control(self, request: dict) -> str:
        turn, kind = self.turn, request["control"]
        if kind == "cool":
            if turn is None and self.process is not None:
                self.retire(self.process)
                return "ok"
            return "busy" if turn is not None else "idle"
        if turn is None or turn.args.turn_id != request.get("turn_id"):
            return "unknown"
        if kind == "interrupt":
            turn.interrupt(time.monotonic(), "cancel")
            return "ok"
        response = request.get("response")
        if not isinstance(response, dict) or not turn.answer(request.get("request_id", ""), response):
            return "unknown"
        return "ok"

    # the loop's steps

    def step(self) -> None:
        now = time.monotonic()
        for process in list(self.ending):
            process.escalate(now, self.grace)
            if process.gone():
                process.cleanup()
                self.ending.remove(process)
        turn, process = self.turn, self.process
        if turn is not None:
            deadline = turn.deadline()
            if deadline is not None and now >= deadline and turn.stop_at is None:
                turn.interrupt(now, "timeout")
            if turn.stop_at is not None and now >= turn.stop_at and process.kill_step is None:
                process.kill_step, process.kill_at = 0, now  # it did not end the turn: the signals now
            process.escalate(now, self.grace)
            if turn.over():
                self.end_turn(0)
            elif process.gone():
                self.end_turn(process.code)
        elif process is not None:
            if process.gone():
                self.process = None
                process.cleanup()
            elif now - process.idle_since >= self.hot_seconds:
                self.retire(process)
        if self.turn is None and self.waiting is not None and not self.ending:
            request, self.waiting = self.waiting, None
            self.start_turn(request)

    def end_turn(self, code: int | None) -> None:
        turn, process = self.turn, self.process
        process.turns += 1
        turn.finish(code)
        say("end", turn.nonce, str(code if code is not None else -1))
        self.turn = None
        process.idle_since = time.monotonic()
        if process.gone():
            self.process = None
            process.cleanup()
        elif self.hot_seconds <= 0 or process.kill_step is not None:
            # Not kept: hot sessions are off, or it ignored an interrupt and is being stopped by signals.
            self.retire(process)

    def retire(self, process: Process) -> None:
        """Ends a process (its input closed; signals follow if it does not go)."""
        process.end(time.monotonic(), self.grace)
        if process is self.process:
            self.process = None
        if process not in self.ending:
            self.ending.append(process)

    def start_turn(self, request: dict) -> None:
        nonce = request["nonce"]
        try:
            args = parse_args(request["args"])
        except SystemExit:
            say("start", nonce, "")
            say("end", nonce, "2")
            return
        env = request.get("env", {})
        self.hot_seconds, self.grace = float(args.hot or 0), float(args.grace)
        os.makedirs(args.log_dir, exist_ok=True)
        key = process_key(args, env)
        if self.process is not None and (self.process.key != key or self.process.gone()):
            self.retire(self.process)
            self.waiting = request  # started once the old process is gone
            return
        try:
            if self.process is None:
                self.process = new_process(args, env, key)
            else:
                renew_token(args.log_dir, env)
        except OSError as exc:
            failed_turn(args, nonce, f"wrapper serve: could not start Claude Code: {exc}")
            self.process = None
            return
        process = self.process
        say("start", nonce, process.process_id)
        self.turn = turn = HotTurn(args, nonce, process)
        turn.open()
        process.send(user_message(request.get("prompt", ""), turn.message_uuid))
        if os.path.exists(f"{turn.base}.cancel"):  # cancelled before it started: after its prompt, or nothing it stops
            turn.interrupt(time.monotonic(), "cancel")

    # the select loop's inputs

    def readable(self) -> list[int]:
        return [p.out_fd for p in [self.process, *self.ending] if p is not None and p.out_fd is not None]

    def writable(self) -> list[int]:
        process = self.process
        return [process.in_fd] if process is not None and process.in_fd is not None and process.outbox else []

    def read(self, fd: int) -> None:
        for process in [self.process, *self.ending]:
            if process is None or process.out_fd != fd:
                continue
            lines = process.read_lines()
            if lines and process is self.process and self.turn is not None:
                lines = self.turn.take(lines)  # what came after its end is no turn's
            if lines:
                refuse_idle_prompts(process, lines)
            return

    def timeout(self) -> float | None:
        now, times = time.monotonic(), []
        turn, process = self.turn, self.process
        if turn is not None:
            times += [t for t in (turn.deadline(), turn.stop_at) if t is not None]
        elif process is not None:
            times.append(process.idle_since + self.hot_seconds)
        times += [p.kill_at for p in [process, *self.ending] if p is not None and p.kill_step is not None]
        return None if not times else max(0.0, min(times) - now)

    def busy(self) -> bool:
        return self.turn is not None or self.waiting is not None


def refuse_idle_prompts(process: Process, lines: list[bytes]) -> None:
    """A permission prompt with no turn to ask for it (it came after the turn's result) is denied."""
    for line in lines:
        if line_type(line) == b"control_request":
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if (message.get("request") or {}).get("subtype") == "can_use_tool":
                process.send({"type": "control_response", "response": {
                    "subtype": "success", "request_id": message.get("request_id"),
                    "response": {"behavior": "deny", "message": "no turn is running to ask for this"}}})


def failed_turn(args: Args, nonce: str, error: str) -> None:
    """The records of a turn that could not start: its exit record, in its log and on stdout."""
    say("start", nonce, "")
    record = "exit\t" + json.dumps({"code": 127, "timed_out": False, "cancelled": False, "oom_killed": False,
                                    "lines": 0, "stderr": error}) + "\n"
    try:
        with open(turn_base(args.log_dir, args.turn_id) + ".log", "w") as log:
            log.write(record)
    except OSError:
        pass
    write_all(1, record.encode())
    say("end", nonce, "127")


def clear_stale_pid_files(log_dir: str) -> None:
    """At start no turn runs here: pid files left by a container that stopped would name other processes."""
    try:
        names = os.listdir(log_dir)
    except OSError:
        return
    for name in names:
        if name.endswith(".run.pid"):
            try:
                os.unlink(os.path.join(log_dir, name))
            except OSError:
                pass


def serve() -> int:
    """Serves requests until the container stops (SIGTERM from Docker's init ends this at once), or until its
    stdin is closed and no turn goes on: the container then stops, and the worker's next turn starts it again
    with a stdin that works (staying up would leave every later turn waiting for an answer that cannot come)."""
    wake_r = wake_on_signals()  # a child's end wakes the select
    clear_stale_pid_files(Args("run").log_dir)
    os.set_blocking(1, False)  # a worker that stops reading must not freeze the loop (see write_all)
    server, pending, reading = Server(), bytearray(), True
    while reading or server.busy():
        watched = [wake_r, *server.readable()] + ([0] if reading else [])
        ready, can_write, _ = select.select(watched, server.writable(), [], server.timeout())
        if wake_r in ready:
            drain(wake_r)
        if can_write:
            server.process.flush()
        for fd in ready:
            if fd not in (0, wake_r):
                server.read(fd)
        if 0 in ready:
            chunk = os.read(0, READ_SIZE)
            reading = bool(chunk)
            pending += chunk
            while (newline := pending.find(b"\n")) >= 0:
                line, pending = bytes(pending[:newline]), pending[newline + 1:]
                if line.strip():
                    server.take(line)
        server.step()
    if server.process is not None:
        server.process.close_stdin()
    return 0
