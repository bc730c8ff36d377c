"""What `wrapper run`, `attach` and `cancel` share: their command line, a turn's files, whether a turn's
processes still run, and how a process group is stopped.

A turn's files, in --log-dir (default ~/.ccd/turns), all named after the turn id (see `turn_base`):
    <turn-id>.log       its records (wrapper/run.py writes them, wrapper/attach.py follows them)
    <turn-id>.run.pid   the pid of its `wrapper run`, while that runs
    <turn-id>.pid       the pid of Claude Code (also its process group), while that runs
    <turn-id>.stderr    what Claude Code writes to stderr, while it runs
    <turn-id>.cancel    left by `wrapper cancel` (wrapper/cancel.py), so the exit record says cancelled
    <turn-id>.mcp.json  the ccd MCP server's config, while the turn runs

This is on `wrapper run`'s path, so it imports only what run.py may (see there).
"""
import _signal
import os
import sys
import time

STOP_SIGNALS = (_signal.SIGINT, _signal.SIGTERM, _signal.SIGKILL)
DEFAULT_LOG_DIR = os.path.join(os.path.expanduser("~"), ".ccd", "turns")

# Each option's placeholder in the usage line; a number of SECONDS is parsed as a float.
OPTIONS = {"--turn-id": "ID", "--session-id": "ID", "--resume": "ID", "--model": "MODEL",
           "--allowed-tools": "TOOLS", "--permission-mode": "MODE", "--append-system-prompt": "PROMPT",
           "--timeout": "SECONDS", "--grace": "SECONDS", "--log-dir": "DIR", "--claude": "PATH",
           "--hot": "SECONDS", "--approvals": "MODE"}
COMMANDS = {"run": tuple(OPTIONS), "attach": ("--turn-id", "--log-dir"),
            "cancel": ("--turn-id", "--grace", "--log-dir")}
DEFAULTS = {"timeout": 3600.0, "grace": 5.0, "log_dir": DEFAULT_LOG_DIR, "claude": "claude"}


class Args:
    """Parsed options: one attribute per option of the command (dashes as underscores), None if not given."""

    def __init__(self, command: str, **values) -> None:
        self.command = command
        for option in COMMANDS[command]:
            name = option[2:].replace("-", "_")
            setattr(self, name, DEFAULTS.get(name))
        self.__dict__.update(values)


def usage(command: str | None) -> str:
    if command is None:
        return "usage: wrapper {run,attach,cancel} --turn-id ID [options]"
    shown = {option: f"{option} {OPTIONS[option]}" for option in COMMANDS[command]}
    words = [shown.pop("--turn-id")]
    if command == "run":
        words.append(f"({shown.pop('--session-id')} | {shown.pop('--resume')})")
    return f"usage: wrapper {command} {' '.join(words + [f'[{word}]' for word in shown.values()])}"


def usage_error(command: str | None, message: str) -> SystemExit:
    """Prints the usage and what is wrong, as argparse would; exit status 2."""
    sys.stderr.write(f"{usage(command)}\nwrapper{' ' + command if command else ''}: error: {message}\n")
    return SystemExit(2)


def parse_args(argv: list[str]) -> Args:
    """The wrapper's command line (`--option value` or `--option=value`); the prompt never travels in argv."""
    command = argv[0] if argv else None
    if command in ("-h", "--help"):
        sys.stdout.write(usage(None) + "\n")
        raise SystemExit(0)
    if command not in COMMANDS:
        raise usage_error(None, f"choose a command: run, attach or cancel (not {command!r})" if command
                          else "a command is required: run, attach or cancel")
    options, values, rest = COMMANDS[command], {}, argv[1:]
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg in ("-h", "--help"):
            sys.stdout.write(usage(command) + "\n")
            raise SystemExit(0)
        option, has_value, value = arg.partition("=")
        if option not in options:
            raise usage_error(command, f"unrecognized arguments: {arg}")
        if not has_value:
            if i + 1 == len(rest):
                raise usage_error(command, f"argument {option}: expected one argument")
            i += 1
            value = rest[i]
        i += 1
        if OPTIONS[option] == "SECONDS":
            try:
                value = float(value)
            except ValueError:
                raise usage_error(command, f"argument {option}: invalid float value: {value!r}") from None
        values[option[2:].replace("-", "_")] = value
    if "turn_id" not in values:
        raise usage_error(command, "the following arguments are required: --turn-id")
    if command == "run":
        if "session_id" in values and "resume" in values:
            raise usage_error(command, "argument --resume: not allowed with argument --session-id")
        if "session_id" not in values and "resume" not in values:
            raise usage_error(command, "one of the arguments --session-id --resume is required")
    return Args(command, **values)


def turn_base(log_dir: str, turn_id: str) -> str:
    """The turn's files' common path: add ".log", ".pid" and so on (listed above)."""
    return os.path.join(log_dir, turn_id)


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting for its parent counts as gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return False


def stop_group(pgid: int, alive, grace: float) -> None:
    """Ends a process group politely, then firmly: interrupt, terminate, kill, `grace` apart.

    The whole group, so the tools Claude Code started (a Bash command) go with it.
    """
    for sig in STOP_SIGNALS:
        if not alive():
            return
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while alive() and time.monotonic() < deadline:
            time.sleep(0.05)


def turn_running(base: str) -> bool:
    """True while the `wrapper run` of the turn at `base` is alive (checked by pid and command line,
    because after a container restart the recorded pid may belong to another process)."""
    try:
        with open(f"{base}.run.pid", "rb") as pid_file:
            pid = int(pid_file.read())
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            args = cmdline.read().split(b"\0")
    except (OSError, ValueError):
        return False
    # A turn of the hot process (wrapper/serve.py) names the serving process, which outlives the turn: its pid file
    # goes when the turn ends.
    ours = (os.path.basename(base).encode() in args and b"run" in args) or b"serve" in args
    return ours and pid_alive(pid)
