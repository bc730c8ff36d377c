"""`wrapper cancel --turn-id T` stops a running turn from a second `docker exec`: it leaves a
marker (so the exit record says cancelled), then interrupts Claude Code's process group,
escalating to terminate and kill (`stop_group` in wrapper/common.py).

`wrapper run` uses it too, to stop a turn left over from a lost worker before it starts its own.
"""
import os

from wrapper.common import Args, pid_alive, stop_group, turn_base


def cancel_turn(args: Args) -> int:
    """Stops a running turn of this container; 0 when it is gone (or was never running)."""
    base = turn_base(args.log_dir, args.turn_id)
    os.close(os.open(f"{base}.cancel", os.O_WRONLY | os.O_CREAT, 0o666))
    try:
        with open(f"{base}.pid", "rb") as pid_file:
            pid = int(pid_file.read())
    except (OSError, ValueError):
        return 0  # not started yet: the marker makes the wrapper stop as soon as it does
    stop_group(pid, lambda: pid_alive(pid), args.grace)
    return 0 if not pid_alive(pid) else 1
