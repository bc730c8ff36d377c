"""Workspace file routes: download it all as tar.gz, get or put one file, upload a tar to unpack."""
from __future__ import annotations

import re
import uuid

from flask import Response, g, request
from werkzeug.routing import PathConverter

from core import admission, files, workspaces
from core import sessions as session_cmds
from core.errors import DomainError, TooLarge, Unavailable, WrongState
from web.api import api, enqueue
from web.context import ctx, unit_of_work


class FilesError(DomainError):
    def __init__(self, reply: dict) -> None:
        super().__init__(reply.get("message") or "the workspace request failed", code=reply.get("code"))
        self.status = int(reply.get("status") or 500)


class LimitedReader:
    """Reads the request body, refusing it (413) as soon as it passes the upload limit."""

    def __init__(self, stream, limit: int) -> None:
        self.stream, self.limit, self.seen = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self.stream.read(size)
        self.seen += len(chunk)
        if self.seen > self.limit:
            raise too_large(self.limit)
        return chunk


def too_large(limit: int) -> TooLarge:
    return TooLarge(f"the upload is larger than CCD_MAX_UPLOAD_BYTES ({limit} bytes); split it up",
                    code="upload_too_large")


def ask_worker(session_id: str, op: str, path: str | None = None, upload=None) -> dict:
    """Sends the request to the session's host and waits for the answer; raises the worker's error."""
    settings, storage = ctx().settings, ctx().storage
    request_id = uuid.uuid4().hex
    with unit_of_work() as db:
        row = session_cmds.get_owned(db, g.owner, session_id, lock=True)
        if row.status in ("deleted", "failed") or row.host_queue is None:
            raise WrongState(f"session {row.id} is {row.status} and has no workspace to reach",
                             code="workspace_unavailable")
        if row.status == "stopped":  # the request starts it again: it must fit the owner's quotas, hold its workspace
            admission.admit_restart(db, row, settings)
            workspaces.hold(db, row)
        host_queue, sid = row.host_queue, str(row.id)
    if upload is not None:
        storage.put(files.transfer_key(request_id, "in"), upload)
    enqueue(ctx().sender.workspace_files, {"id": request_id, "session_id": sid, "op": op, "path": path},
            host_queue)
    reply = files.wait_reply(ctx().events.redis, settings.key_prefix, request_id, settings.files_timeout_seconds)
    if reply is None:
        storage.delete(files.transfer_key(request_id, "in"))
        raise Unavailable(f"the session's host did not answer within {settings.files_timeout_seconds}s "
                          "(CCD_FILES_TIMEOUT_SECONDS); is its worker running?", code="files_timeout")
    if not reply.get("ok"):
        raise FilesError(reply)
    return reply


def send_download(reply: dict, filename: str, mimetype: str) -> Response:
    """Streams the worker's result out of object storage, then removes it."""
    storage = ctx().storage

    def chunks():
        try:
            with storage.open(reply["key"]) as source:
                while chunk := source.read(1 << 16):
                    yield chunk
        finally:
            storage.delete(reply["key"])

    safe = re.sub(r"[^A-Za-z0-9._-]", "_", filename) or "download"
    headers = {"Content-Length": str(reply["size"]), "Content-Disposition": f'attachment; filename="{safe}"'}
    return Response(chunks(), 200, headers, mimetype=mimetype)


def upload_body():
    limit = ctx().settings.max_upload_bytes
    request.max_content_length = limit + 1  # one byte more: LimitedReader, not werkzeug, says "too large"
    if request.content_length is not None and request.content_length > limit:
        raise too_large(limit)
    return LimitedReader(request.stream, limit)


@api.get("/sessions/<session_id>/workspace")
def download_workspace(session_id: str):
    """The whole workspace as a tar.gz (symlinks stored as links, never followed)."""
    reply = ask_worker(session_id, "archive")
    return send_download(reply, f"workspace-{session_id}.tar.gz", "application/gzip")


@api.post("/sessions/<session_id>/workspace")
def upload_archive(session_id: str):
    """Unpacks a tar (plain, gzip, bzip2 or xz) into the workspace: only files and directories, all inside it,
    within the caps on unpacked bytes and members (checked in the container, before anything is written)."""
    reply = ask_worker(session_id, "untar", upload=upload_body())
    return {"files": reply.get("files", 0), "bytes": reply.get("bytes", 0)}, 200


class AnyPath(PathConverter):
    """Like <path:…> but also takes a leading slash, so an absolute path reaches clean_path and is refused
    (with merge_slashes=False, ".../files//etc/passwd" is not redirected to "etc/passwd" either)."""
    regex = ".+?"
    part_isolating = False  # werkzeug would guess True, as the regex names no "/"


@api.record_once
def _register_converter(state) -> None:
    state.app.url_map.converters["anypath"] = AnyPath


@api.get("/sessions/<session_id>/workspace/files/<anypath:path>", merge_slashes=False)
def get_file(session_id: str, path: str):
    clean = files.clean_path(path)
    reply = ask_worker(session_id, "get", clean)
    return send_download(reply, clean.rsplit("/", 1)[-1], "application/octet-stream")


@api.put("/sessions/<session_id>/workspace/files/<anypath:path>", merge_slashes=False)
def put_file(session_id: str, path: str):
    clean = files.clean_path(path)
    reply = ask_worker(session_id, "put", clean, upload=upload_body())
    return {"path": clean, "bytes": reply.get("bytes", 0)}, 200
