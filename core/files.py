"""Workspace file requests: how the web tier asks a session's host to read or write its files.

The web tier never talks to Docker, so a file request travels like this: an upload is put in
object storage, a `workspace_files` task goes to the session's host queue, the worker runs
`wrapper.files` in the container as the agent user, a download is put in object storage, and
the worker answers on a Redis list the web tier is waiting on.
"""
from __future__ import annotations

import json

import redis

from core.errors import ValidationFailed

OPS = ("archive", "get", "put", "untar")
# wrapper.files exit codes -> (HTTP status, error code)
EXIT_ERRORS = {2: (404, "file_not_found"), 3: (422, "not_a_file"), 4: (422, "invalid_path"),
               5: (422, "invalid_archive"), 6: (413, "archive_too_large"), 7: (413, "download_too_large")}


def download_too_large(limit: int) -> dict:
    """The worker's answer when a download passes its limit (the worker stopped reading there)."""
    return {"ok": False, "status": 413, "code": "download_too_large",
            "message": f"the download is larger than CCD_MAX_DOWNLOAD_BYTES ({limit} bytes); "
                       "fetch smaller parts with the file API"}


def clean_path(path: str) -> str:
    """A workspace-relative path, refused early when it cannot be one (the container checks again)."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if (path.startswith("/") or "\\" in path or any(ord(c) < 32 for c in path) or not parts or ".." in parts
            or len(path) > 4096):
        raise ValidationFailed(f"{path!r} is not a path inside the workspace: give a relative path "
                               "without '..'", code="invalid_path", field="path")
    return "/".join(parts)


def transfer_key(request_id: str, direction: str) -> str:
    """Where an upload waits for the worker ("in"), or a download for the web tier ("out")."""
    return f"transfers/{request_id}/{direction}"


def reply_key(prefix: str, request_id: str) -> str:
    return f"{prefix}:files:{request_id}"


def send_reply(client: redis.Redis, prefix: str, request_id: str, reply: dict, ttl: int) -> None:
    key = reply_key(prefix, request_id)
    pipe = client.pipeline()
    pipe.rpush(key, json.dumps(reply))
    pipe.expire(key, ttl)
    pipe.execute()


def wait_reply(client: redis.Redis, prefix: str, request_id: str, timeout: int) -> dict | None:
    """The worker's answer, or None when it does not come within `timeout` seconds."""
    found = client.blpop([reply_key(prefix, request_id)], timeout=timeout)
    return json.loads(found[1]) if found else None
