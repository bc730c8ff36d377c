"""The disk watcher: measures every live session's workspace and home volumes on this host, from outside the
session, and stops a session whose volumes together hold more than its disk limit (reason `disk_quota`)."""
from __future__ import annotations

import contextvars
import logging
import random
import threading
import time
import uuid

from docker.errors import APIError, NotFound
from docker.types import LogConfig, Mount
from sqlalchemy import select

from core import batches
from core.db import transaction
from core.envelope import status_event
from core.models import Session
from core.sessions import request_stop
from core.settings import Settings
from core.turn_ends import ended_event
from core.turn_states import TurnReason
from core.turns import cancel_running_turns
from workers.context import WorkerContext
from workers.runtime import DockerRuntime, disk_limit_mb

log = logging.getLogger(__name__)

MB = 1 << 20
# Sessions in these states may be writing: their volumes are measured.
WATCHED_STATES = ("ready", "busy")
# The longest one volume's walk may take. A tree that cannot be walked in this time (millions of files) would
# never be measured: its session is stopped, as over its limit. A pass (every volume of the host) takes at most
# WALK_SECONDS; what it did not reach is measured by a later pass.
SESSION_WALK_SECONDS = 60
WALK_SECONDS = 120
# The helper's script: du for each volume under `timeout`; a walk cut short prints "cut <exit code>\t<volume>":
# 124 out of time, 137 killed (its memory limit: du keeps every hard-linked inode it has seen).
WALK = 'for t; do timeout "$0" du -s -x -B1 "$t"; c=$?; [ "$c" -le 1 ] || printf "cut %s\\t%s\\n" "$c" "$t"; done'
CUT_SHORT = ("cut 124", "cut 137")
HELPER_LIMITS = {"mem_limit": "256m", "memswap_limit": "256m", "pids_limit": 16, "nano_cpus": 500_000_000}


def check(ctx: WorkerContext) -> dict[str, int]:
    """One pass over this host's running session containers; returns how many it measured and stopped."""
    containers = {sid: c for sid, c in ctx.runtime.session_containers().items() if c.status == "running"}
    if not containers:
        return {"measured": 0, "stopped": 0}
    with transaction(ctx.db) as db:
        configs = dict(db.execute(select(Session.id, Session.config).where(
            Session.id.in_([uuid.UUID(s) for s in containers]), Session.status.in_(WATCHED_STATES))).all())
    volumes = {str(sid): ctx.runtime.mounted_volumes(containers[str(sid)]) for sid in configs}
    used, cut = measure(ctx.runtime, {sid: names for sid, names in volumes.items() if names})
    stopped = 0
    for sid, config in configs.items():
        limit = disk_limit_mb(config, ctx.settings)
        if str(sid) in cut:
            why = (f"the session's volumes could not be measured within {SESSION_WALK_SECONDS} s (too many "
                   f"files); its disk limit is {limit} MB (config.limits.disk_mb)")
        elif used.get(str(sid), 0) > limit * MB:
            why = (f"the session's workspace and home volumes hold {used[str(sid)] / MB:.1f} MB, over its disk "
                   f"limit of {limit} MB (config.limits.disk_mb); it was stopped")
        else:
            continue
        stopped += stop_over_quota(ctx, str(sid), why)
    return {"measured": len(used), "stopped": stopped}


def measure(runtime: DockerRuntime, volumes: dict[str, list[str]]) -> tuple[dict[str, int], set[str]]:
    """Bytes allocated in each session's volumes, and the sessions whose own walk was cut short (too many files).

    One short-lived helper container walks them all: `du` as root with the volumes mounted read-only and no other
    capability than reading any file (so a chmod 000 directory hides nothing), no network. `du` counts allocated
    blocks (a sparse file costs what it holds; space reserved past a file's end by `fallocate --keep-size`, which
    the engine's own `docker system df` misses, is counted) and each hard link once. The sessions go in a new
    order each pass, so a pass that runs out of time leaves different ones for the next.
    """
    if not volumes:
        return {}, set()
    order = list(volumes)
    random.shuffle(order)
    targets: dict[str, str] = {}
    mounts = []
    for sid in order:
        for i, name in enumerate(volumes[sid]):
            target = f"/m/{sid}/{i}"
            targets[target] = sid
            mounts.append(Mount(target, name, type="volume", read_only=True))
    out, _code = run_helper(runtime, ["sh", "-c", WALK, str(SESSION_WALK_SECONDS), *targets], mounts)
    remove_made_by_helper(runtime, {name for names in volumes.values() for name in names})
    used: dict[str, int] = {}
    walked, cut = set(), set()
    for line in out.splitlines():
        size, _, target = line.partition("\t")
        if target not in targets:
            continue
        if size.isdigit():
            used[targets[target]] = used.get(targets[target], 0) + int(size)
            walked.add(target)
        elif size in CUT_SHORT:
            cut.add(targets[target])
    for target in targets:
        if target not in walked:
            used.pop(targets[target], None)  # half a session is not its usage
    if len(walked) < len(targets) - len(cut):
        log.warning("disk watcher: %d of %d volumes were not measured in this pass",
                    len(targets) - len(walked), len(targets))
    return used, cut


def run_helper(runtime: DockerRuntime, argv: list[str], mounts: list[Mount]) -> tuple[str, int | None]:
    """Runs argv as root in a throwaway container of the session image; its stdout and exit code (None: it ran
    out of time and was killed)."""
    host = runtime.api.create_host_config(
        mounts=mounts, network_mode="none", read_only=True, cap_drop=["ALL"], cap_add=["DAC_READ_SEARCH"],
        security_opt=["no-new-privileges"], log_config=LogConfig(type="json-file", config={"max-size": "1m"}),
        **HELPER_LIMITS)
    labels = {"ccd.prefix": runtime.settings.key_prefix, "ccd.role": "disk-usage"}
    config = runtime.api.create_container_config(runtime.settings.image, argv, user="0", labels=labels,
                                                 host_config=host, network_disabled=True)
    name = f"{runtime.settings.key_prefix}-disk-usage-{uuid.uuid4().hex[:12]}"
    container = runtime.api.create_container_from_config(config, name)["Id"]
    try:
        runtime.api.start(container)
        code = wait_exit(runtime, container, WALK_SECONDS)
        if code is None:
            log.warning("disk watcher: the walk of this host's session volumes took over %s s", WALK_SECONDS)
            runtime.api.kill(container)
        return runtime.api.logs(container, stdout=True, stderr=False).decode("utf-8", "replace"), code
    finally:
        try:
            runtime.api.remove_container(container, force=True)
        except NotFound:
            pass


def wait_exit(runtime: DockerRuntime, container: str, seconds: float) -> int | None:
    """The container's exit code once it exits; None if it still runs after `seconds`. Polled: the engine's wait
    answers at once and sends its result at the exit, which a read timeout does not bound."""
    deadline = time.monotonic() + seconds
    while True:
        state = runtime.api.inspect_container(container)["State"]
        if not state.get("Running") and state.get("Status") != "created":
            return state.get("ExitCode")
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def remove_made_by_helper(runtime: DockerRuntime, names: set[str]) -> None:
    """A session deleted between the list and the helper's start had its volumes made again, empty and unlabelled,
    by the helper's mounts: those are removed (ours are labelled, and stay)."""
    for volume in runtime.api.volumes(filters={"dangling": True}).get("Volumes") or []:
        if volume["Name"] in names and not (volume.get("Labels") or {}).get("ccd.prefix"):
            runtime.remove_volumes([volume["Name"]])


def stop_over_quota(ctx: WorkerContext, session_id: str, why: str) -> bool:
    """Stops a session over its disk limit: its container at once (the writes stop now, not when a worker is free),
    its running turn ends `failed` (`disk_quota`), its queued turns are cancelled, and the stream says why."""
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id), with_for_update=True)
        if row is None or row.status not in WATCHED_STATES:
            return False  # it moved on (stopped, deleted) while we measured
        ended = request_stop(db, row)
        row.error = why
        running = cancel_running_turns(db, row.id, reason=TurnReason.DISK_QUOTA, error=why)
        host_queue = row.host_queue
        # Under the row lock, so no status change of another's can come between.
        ctx.events.publish_many([ended_event(t) for t in ended]
                                + [status_event(session_id, "stopping", why, reason="disk_quota")])
    log.warning("session %s: %s", session_id, why)
    ctx.runtime.stop(session_id, grace_seconds=0)
    ctx.cancels.send(running)
    for turn in ended:
        if turn.webhook:
            ctx.sender.deliver_webhook("turn", str(turn.id))
    batch_ids = list({turn.batch_id for turn in ended if turn.batch_id})
    if batch_ids:
        batches.advance(ctx.db, ctx.events, ctx.sender, ctx.cancels, ctx.settings, batch_ids)
    ctx.sender.stop_session(session_id, host_queue, reason="disk_quota")
    return True


def watch(settings: Settings) -> threading.Thread:
    """Starts the watcher in a thread of the worker's main process, every CCD_DISK_CHECK_SECONDS: a task would
    wait behind the turns that fill every worker slot, which is when a session writes."""
    ctx = WorkerContext(settings)

    def loop() -> None:
        while True:
            started = time.monotonic()
            try:
                result = check(ctx)
                log.debug("disk watcher: %s in %.2f s", result, time.monotonic() - started)
            except APIError as exc:  # e.g. the image is missing: the next pass tries again
                log.warning("disk watcher: could not measure this host's sessions: %s", exc)
            except Exception:
                log.exception("disk watcher: a pass failed")
            time.sleep(max(0.0, settings.disk_check_seconds - (time.monotonic() - started)))

    thread = threading.Thread(target=contextvars.copy_context().run, args=(loop,), name="disk-watcher", daemon=True)
    thread.start()
    return thread
