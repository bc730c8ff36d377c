"""`python -m workers worker|webhooks|beat|proxy|firewall|check`: a worker for this host's queues, the webhook
consumer (no Docker client), the scheduler, the model proxy, the host firewall keeper (for deployments where the
worker itself may not change the host's firewall), or a one-off readiness check of Postgres and Redis (and Docker
with --docker) for healthchecks."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from celery.signals import setup_logging as setup_celery_logging

from core.errors import ConfigError
from core.logs import LineLogger, setup_logging
from core.metrics import use_private_multiprocess_dir
from core.settings import Settings
from workers import health_server, host_firewall


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers")
    parser.add_argument("role", choices=["worker", "webhooks", "beat", "proxy", "firewall", "check"])
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--docker", action="store_true", help="check: Docker too, not only Postgres and Redis")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, settings.log_format)
    if args.role == "proxy":
        from workers.model_proxy import serve

        try:
            serve(settings)
        except ConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.role == "firewall":
        host_firewall.keep_guarding(settings)
        return 0
    if args.role == "check":  # a healthcheck for processes without a port (compose's beat and webhooks)
        checks = health_server.Readiness(settings).check(docker=args.docker)
        status, body = health_server.readiness_body(checks)
        print(json.dumps(body))
        return 0 if status == 200 else 1
    if args.role == "webhooks":
        if not settings.webhook_secret:  # it would sign deliveries already queued with an empty key
            print("error: the webhook consumer signs every delivery: set CCD_WEBHOOK_SECRET (32 bytes or more: "
                  "openssl rand -hex 32), the same as the web's", file=sys.stderr)
            return 2
        from workers.webhook_worker import create_webhook_app  # and nothing that imports the Docker runtime

        app, _ = create_webhook_app(settings)
        run_worker(app, settings, settings.webhook_queue, args.concurrency or settings.webhook_concurrency,
                   f"ccd-webhooks@{settings.host_name}")
        return 0
    if args.role == "worker":  # before any metric is defined and before the prefork children are forked
        use_private_multiprocess_dir(f"{settings.key_prefix}-worker-metrics")
    from workers.celery_app import create_worker_app  # here: it defines the turn metrics (workers/metrics.py)

    app, ctx = create_worker_app(settings)
    level = settings.log_level.upper()
    plain = keep_celery_logging_ours(settings)
    if args.role == "beat":
        schedule = Path(tempfile.gettempdir()) / f"{settings.key_prefix}-beat-schedule"
        app.start([*plain, "beat", f"--loglevel={level}", f"--schedule={schedule}"])
        return 0
    network = ctx.runtime.ensure_network()  # fail fast when Docker is not reachable
    if settings.host_firewall == "true":
        host_firewall.guard(host_firewall.bridge_name(network), settings)
    elif not settings.host_firewall_status:
        logging.getLogger("workers").warning(
            "CCD_HOST_FIREWALL=external without CCD_HOST_FIREWALL_STATUS: sessions start on the word that another "
            "component guards bridge %s", host_firewall.bridge_name(network))
    try:
        ctx.runtime.require_firewall()
    except host_firewall.FirewallMissing as exc:  # the worker serves; its session starts fail with this reason
        logging.getLogger("workers").error("no session will start on this host until this is fixed: %s", exc)
    health_server.start(settings)
    from workers import disk_quota  # the Docker SDK: only the worker loads it (the webhook consumer must not)

    disk_quota.watch(settings)
    host_firewall.watch(settings)
    run_worker(app, settings, f"{settings.placement_queue},{settings.host_queue()}",
               args.concurrency or settings.worker_concurrency, f"ccd@{settings.host_name}", plain)
    return 0


def run_worker(app, settings: Settings, queues: str, concurrency: int, hostname: str,
               plain: list[str] | None = None) -> None:
    """Runs a Celery worker of `app` on `queues` in this process until it is stopped."""
    plain = keep_celery_logging_ours(settings) if plain is None else plain
    app.worker_main([*plain, *(["--quiet"] if plain else []), "worker", f"--loglevel={settings.log_level.upper()}",
                     "-Q", queues, f"--concurrency={concurrency}", f"--hostname={hostname}",
                     "--without-gossip", "--without-mingle"])


def keep_celery_logging_ours(settings: Settings) -> list[str]:
    """Stops Celery from setting up logging (its handlers, its stdout redirect): ours stands. With
    LOG_FORMAT=json, what Celery prints (beat's start-up lines) is logged line by line; returns the Celery
    options for that (the worker adds --quiet: its banner is noise as log lines)."""
    setup_celery_logging.connect(lambda **_: None, weak=False, dispatch_uid="ccd-logging")
    if settings.log_format != "json":
        return []
    # sys.__stdout__ too: Celery prints its banner there, and writes its shutdown notes straight to its file
    # descriptor, which a LineLogger does not have (so those notes are left out rather than printed raw).
    sys.stdout = sys.__stdout__ = LineLogger(logging.getLogger("celery.stdout"))
    return ["--no-color"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
