"""`wrapper serve`: the session container's main process (under Docker's init). It starts each turn's
`wrapper run` when the worker asks on the container's stdin, through a `docker attach`, so that a turn costs
no `docker exec`: an exec costs dockerd, containerd and runc about 60 ms of CPU, an attach about 3 (measured).

The worker writes one request per line, JSON:
    {"nonce": "...", "expires": <unix time>, "args": ["run", "--turn-id", ...], "env": {...}, "prompt": "..."}
and reads the container's stdout, where this writes marker lines around the run's own records (wrapper/run.py):
    accepted\t<nonce>       taken (the worker stops waiting for an answer)
    start\t<nonce>          the run was started (written before it can print anything)
    end\t<nonce>\t<code>    the run ended, with its exit code (after its exit record, if it wrote one)
    stale\t<nonce>          the request came after its expiry, and nothing was run

One run at a time, so the stdout holds one turn's records: a request that comes while a run goes on (one left
over from a lost worker) stops that run first (SIGTERM: it stops Claude Code as a cancel does and writes its
exit record), as an exec'd run stops a left-over one. Only `run` is served; `attach` and `cancel` stay
`docker exec`s (they are rare), and find the run as they find an exec'd one: it has the same command line.
A request that arrives late (written to a container that then stopped, and handed over after a restart) has
been given up on by its worker: it is dropped, so a turn never runs twice that way.
"""
import _signal
import json
import os
import select
import sys
import time

from wrapper.run import drain, wake_on_signals, write_all

# The interpreter line the worker also uses for `attach` and `cancel` (workers/runtime.py: WRAPPER).
RUN = ["-S", "-P", "-c", "import sys; from wrapper.__main__ import main; sys.exit(main(sys.argv[1:]))"]
READ_SIZE = 1 << 16
# A run told to stop has its own escalation (interrupt, terminate, kill Claude Code, `--grace` apart); past
# this it is killed outright.
KILL_AFTER_SECONDS = 60.0


def say(*fields: str) -> None:
    """One marker line on stdout. Blocking writes: a run sets the shared stdout non-blocking."""
    write_all(1, ("\t".join(fields) + "\n").encode())


def valid(request) -> bool:
    if not isinstance(request, dict) or not isinstance(request.get("nonce"), str) or not request["nonce"]:
        return False
    args, env = request.get("args"), request.get("env", {})
    return (isinstance(args, list) and args[:1] == ["run"] and isinstance(env, dict)
            and isinstance(request.get("prompt", ""), str) and isinstance(request.get("expires"), (int, float))
            and all(isinstance(item, str) for item in [*args, *env, *env.values()]))


def spawn(request: dict) -> int | None:
    """Starts the request's run, its prompt on stdin; its pid, or None (its end said) when it could not start."""
    nonce = request["nonce"]
    # The prompt from memory, not a pipe: it may be larger than a pipe holds, and this loop must not wait.
    prompt_fd = os.memfd_create("prompt")
    try:
        write_all(prompt_fd, request.get("prompt", "").encode())
        os.lseek(prompt_fd, 0, os.SEEK_SET)
        say("start", nonce)
        try:
            return os.posix_spawn(sys.executable, [sys.executable, *RUN, *request["args"]],
                                  {**os.environ, **request.get("env", {})},
                                  file_actions=[(os.POSIX_SPAWN_DUP2, prompt_fd, 0)],
                                  setsigdef=(_signal.SIGPIPE, _signal.SIGXFSZ))
        except OSError as exc:
            sys.stderr.write(f"wrapper serve: could not start the turn: {exc}\n")
            say("end", nonce, "127")
            return None
    finally:
        os.close(prompt_fd)


class Server:
    def __init__(self) -> None:
        self.running: tuple[int, str] | None = None  # (pid, nonce) of the run going on
        self.waiting: dict | None = None  # the request to start once that run has ended
        self.kill_at: float | None = None

    def take(self, line: bytes) -> None:
        try:
            request = json.loads(line)
        except ValueError:
            request = None
        if not valid(request):
            sys.stderr.write("wrapper serve: not a turn request; ignored\n")
            return
        if time.time() > request["expires"]:
            say("stale", request["nonce"])
            return
        say("accepted", request["nonce"])
        if self.waiting is not None:  # superseded before it started, as a newer run would have stopped it
            say("end", self.waiting["nonce"], str(-_signal.SIGTERM))
        self.waiting = request
        if self.running is not None and self.kill_at is None:
            self.signal(_signal.SIGTERM)
            self.kill_at = time.monotonic() + KILL_AFTER_SECONDS

    def signal(self, signum: int) -> None:
        try:
            os.kill(self.running[0], signum)
        except ProcessLookupError:
            pass

    def step(self) -> None:
        """Reaps an ended run (never waits), kills one that outstayed its stop, starts the waiting request."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break
            if self.running is not None and pid == self.running[0]:
                say("end", self.running[1], str(os.waitstatus_to_exitcode(status)))
                self.running, self.kill_at = None, None
        if self.kill_at is not None and time.monotonic() >= self.kill_at:
            self.signal(_signal.SIGKILL)
            self.kill_at = None
        if self.running is None and self.waiting is not None:
            request, self.waiting = self.waiting, None
            pid = spawn(request)
            if pid is not None:
                self.running = (pid, request["nonce"])

    def timeout(self) -> float | None:
        return None if self.kill_at is None else max(0.0, self.kill_at - time.monotonic())


def serve() -> int:
    """Serves requests until the container stops (SIGTERM from Docker's init ends this at once), or until its
    stdin is closed and no run goes on: the container then stops, and the worker's next turn starts it again
    with a stdin that works (staying up would leave every later turn waiting for an answer that cannot come)."""
    wake_r = wake_on_signals()  # a run's end wakes the select
    server, pending, reading = Server(), bytearray(), True
    while reading or server.running is not None or server.waiting is not None:
        ready = select.select([wake_r, 0] if reading else [wake_r], [], [], server.timeout())[0]
        if wake_r in ready:
            drain(wake_r)
        if 0 in ready:
            chunk = os.read(0, READ_SIZE)
            reading = bool(chunk)
            pending += chunk
            while (newline := pending.find(b"\n")) >= 0:
                line, pending = bytes(pending[:newline]), pending[newline + 1:]
                if line.strip():
                    server.take(line)
        server.step()
    return 0
