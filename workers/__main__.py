"""`python -m workers worker|beat|proxy|firewall`: a worker for this host's queues, the scheduler, the model proxy,
or the host firewall keeper (for deployments where the worker itself may not change the host's firewall)."""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from core.errors import ConfigError
from core.logs import setup_logging
from core.settings import Settings
from workers import host_firewall
from workers.celery_app import create_worker_app


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("role", choices=["worker", "beat", "proxy", "firewall"])
    parser.add_argument("--concurrency", type=int)
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level)
    if args.role == "proxy":
        from workers.model_proxy import serve

        serve(settings)
        return 0
    if args.role == "firewall":
        host_firewall.keep_guarding(settings)
        return 0
    app, ctx = create_worker_app(settings)
    level = settings.log_level.upper()
    if args.role == "beat":
        schedule = Path(tempfile.gettempdir()) / f"{settings.key_prefix}-beat-schedule"
        app.start(["beat", f"--loglevel={level}", f"--schedule={schedule}"])
        return 0
    network = ctx.runtime.ensure_network()  # fail fast when Docker is not reachable
    if settings.host_firewall:
        host_firewall.guard(host_firewall.bridge_name(network), settings)
    queues = f"{settings.placement_queue},{settings.host_queue()}"
    app.worker_main(["worker", f"--loglevel={level}", "-Q", queues,
                     f"--concurrency={args.concurrency or settings.worker_concurrency}",
                     f"--hostname=ccd@{settings.host_name}", "--without-gossip", "--without-mingle"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
