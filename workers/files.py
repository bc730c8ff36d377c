"""Serves workspace file requests on this host (see core/files.py for the round trip)."""
from __future__ import annotations

import json
import logging
import tempfile
import uuid

from core import files
from core.db import transaction
from core.models import Session, utcnow
from workers.context import WorkerContext
from workers.lifecycle import publish_status, wake
from workers.runtime import OutputTooLarge, helper

log = logging.getLogger(__name__)

FILES = helper("files")  # wrapper/files.py, started as the turn agent is: nothing of the workspace runs instead


def helper_argv(settings, request: dict) -> list[str]:
    """The helper's command line for one request, with the limits it keeps to (the worker checks them too)."""
    op = request["op"]
    if op == "put":
        return FILES + ["put", request["path"]]
    if op == "untar":
        return FILES + ["untar", str(settings.unpacked_limit), str(settings.max_archive_members)]
    if op == "get":
        return FILES + ["get", request["path"], str(settings.max_download_bytes)]
    return FILES + ["archive", str(settings.max_download_bytes), str(settings.unpacked_limit)]


def serve(ctx: WorkerContext, request: dict) -> None:
    """Runs one request and always answers, so the waiting web request never hangs on an error."""
    try:
        reply = run(ctx, request)
    except Exception as exc:
        log.exception("workspace %s of session %s failed", request.get("op"), request.get("session_id"))
        reply = {"ok": False, "status": 503, "code": "files_failed",
                 "message": f"the workspace request failed on {ctx.settings.host_name}: {exc}; try again"}
    files.send_reply(ctx.events.redis, ctx.settings.key_prefix, request["id"], reply,
                     ctx.settings.files_timeout_seconds * 2)


def run(ctx: WorkerContext, request: dict) -> dict:
    session_id, op = request["session_id"], request["op"]
    container_id = awake_container(ctx, session_id)
    if container_id is None:
        return {"ok": False, "status": 409, "code": "workspace_unavailable",
                "message": "the session has no container (deleted or never started)"}
    inbound, outbound = files.transfer_key(request["id"], "in"), files.transfer_key(request["id"], "out")
    argv, limit = helper_argv(ctx.settings, request), ctx.settings.max_download_bytes
    # The spool on the worker's disk holds at most `limit` bytes: past it the worker stops reading.
    with tempfile.TemporaryFile() as spool:
        try:
            if op in ("put", "untar"):
                try:
                    with ctx.storage.open(inbound) as source:
                        result = ctx.runtime.exec_io(container_id, argv, stdin=source, stdout=spool)
                finally:
                    ctx.storage.delete(inbound)
            else:
                result = ctx.runtime.exec_io(container_id, argv, stdout=spool, max_stdout=limit)
        except OutputTooLarge as exc:
            if op in ("put", "untar"):
                raise RuntimeError(f"the workspace helper wrote more than {exc.limit} bytes of summary") from None
            return files.download_too_large(limit)
        if result.exit_code in files.EXIT_ERRORS:
            status, code = files.EXIT_ERRORS[result.exit_code]
            return {"ok": False, "status": status, "code": code, "message": result.stderr.strip()[-500:]}
        if result.exit_code != 0:
            raise RuntimeError(f"{op} exited {result.exit_code}: {result.stderr.strip()[-500:]}")
        spool.seek(0)
        if op in ("put", "untar"):
            return {"ok": True, **json.loads(spool.read() or b"{}")}
        stored = ctx.storage.put(outbound, spool)
        return {"ok": True, "key": stored.key, "size": stored.size}


def awake_container(ctx: WorkerContext, session_id: str) -> str | None:
    """The session's running container: a stopped session is started (and counts as ready again)."""
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id))
        if row is None or row.status in ("deleted", "failed", "creating") or ctx.runtime.find(session_id) is None:
            return None
        owner, config = row.owner, dict(row.config)
    container_id = wake(ctx, session_id, owner, config)
    with transaction(ctx.db) as db:
        row = db.get(Session, uuid.UUID(session_id), with_for_update=True)
        woke = row.status == "stopped"
        row.last_active_at = utcnow()  # a file request counts as activity: no idle stop right after it
        if woke:
            row.status = "ready"
    if woke:
        publish_status(ctx, session_id, "ready", reason="started again for a workspace request")
    return container_id
