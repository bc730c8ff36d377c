"""`make bench`: runs the benchmarks against a private stack, prints the table, writes bench/results.json.

    python -m bench [--only M1,M4] [--quick] [--clients 1000] [--out bench/results.json]
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from bench import (m1_turn, m2_dispatch, m3_events, m4_start, m5_fanout, m6_intake, m7_throughput, m8_approval,
                   m9_memory)
from bench.stack import BenchStack
from bench.stats import machine, table, write_results

ORDER = ["M1", "M2", "M3", "M4", "M5", "M7", "M8", "M9", "M6"]  # M6 stops the worker, so it goes last


def plan(args) -> dict:
    """What each benchmark runs, full or --quick (a smoke run: every code path, few samples)."""
    q = args.quick
    return {
        "M1": lambda b: [*m1_turn.measure(b, 5 if q else 40, "text"), *m1_turn.measure(b, 3 if q else 40, "bash"),
                         m1_turn.measure_cold(b, 2 if q else 10)],
        "M2": lambda b: [m2_dispatch.measure(b, 50 if q else 500)],
        "M3": lambda b: m3_events.measure(b, 1 if q else 5),
        "M4": lambda b: m4_start.measure(b, 3 if q else 25),
        "M5": lambda b: [m5_fanout.measure(b, 50 if q else args.clients, seconds=5 if q else 20)],
        "M7": lambda b: [m7_throughput.measure(b, 1 if q else 3, per_session=2 if q else 8)],
        "M8": lambda b: [m8_approval.measure(b, 3 if q else 30)],
        "M9": lambda b: m9_memory.measure(b, 2 if q else 4),
        "M6": lambda b: m6_intake.measure(b, 1 if q else 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated ids, e.g. M1,M4 (default: all)")
    parser.add_argument("--quick", action="store_true", help="few samples: checks the suite runs, proves nothing")
    parser.add_argument("--clients", type=int, default=1000, help="M5's WebSocket clients (default 1000)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    wanted = [m.strip().upper() for m in args.only.split(",") if m.strip()] or ORDER
    unknown = set(wanted) - set(ORDER)
    if unknown:
        parser.error(f"unknown benchmark {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    steps, figures, failed, started = plan(args), [], [], time.monotonic()
    say = lambda text: print(f"[bench {time.monotonic() - started:6.1f}s] {text}", flush=True)  # noqa: E731
    with BenchStack(log=say) as bench:
        for name in [m for m in ORDER if m in wanted]:
            say(f"{name} ...")
            try:
                found = steps[name](bench)
            except Exception as exc:  # one broken figure still leaves the others' results
                say(f"{name} failed: {exc!r}")
                failed.append(name)
                continue
            figures += found
            for figure in found:
                say(f"{figure.id}: ours {fmt_summary(figure.ours)}; baseline {fmt_summary(figure.baseline)}; "
                    f"{figure.derived}; met: {figure.met}")
    print()
    print(table(figures))
    context = {"before_hot": {"M7": m7_throughput.stored_figure()}, "failed": failed, "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "quick": args.quick,
               "machine": machine(), "commit": git_commit(), "seconds": round(time.monotonic() - started)}
    write_results(Path(args.out), figures, context)
    print(f"\nwrote {args.out} ({context['seconds']} s)")
    if failed:
        print(f"these could not be measured (see above): {', '.join(failed)}")
    return 1 if failed else 0


def fmt_summary(found: dict | None) -> str:
    if not found:
        return "-"
    return ", ".join(f"{k} {v:.1f}" for k, v in found.items() if k != "n") + f" (n={found['n']})"


def git_commit() -> str:
    found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
