"""`wrapper attach --turn-id T`: prints the turn log's records and follows it until the exit record,
for a worker that lost the stream (it was killed or restarted). The turn itself keeps running,
because a lost reader costs `wrapper run` nothing (stdout errors are ignored, the log goes on).
It exits 3 when the turn's process is gone without an exit record (the container restarted).
"""
import sys
import time

from wrapper.common import Args, turn_base, turn_running

ATTACH_POLL_SECONDS = 0.05


def attach_turn(args: Args) -> int:
    """Prints the turn log's records and follows it; 0 after the exit record, 3 if the turn died without one."""
    base = turn_base(args.log_dir, args.turn_id)
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
