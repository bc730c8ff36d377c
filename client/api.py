"""A small typed client for the cc-docker HTTP API (sessions, spawn trees, chat, events, turns,
tool approvals, workspace files, batches)."""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import quote

import requests

from client.errors import (ApiError, Conflict, ConnectionFailed, NotFound, OverLimit,  # noqa: F401
                           Unauthorized, Unavailable, ValidationError, raise_for)
from client.follow import MAX_RECONNECTS, READ_ERRORS, Event, EventFollower, backoff, id_before, split_lines

FINAL_EVENT_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
FINISHED_TURN_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
CONNECT_TIMEOUT = 10.0
# The server holds a workspace request up to CCD_FILES_TIMEOUT_SECONDS (120 s by default) while the
# session's worker answers, and starts a stopped session first: file requests get this long to answer.
FILES_TIMEOUT = 180.0
# How long one wait_turn request asks the server to hold it: under the 60 s idle timeout of common proxies.
LONG_POLL_SECONDS = 50
CHUNK_BYTES = 1 << 16


class Client:
    """The cc-docker API at `url`, called with a bearer `token`; `timeout` bounds each request."""

    def __init__(self, url: str, token: str, timeout: float = 30, files_timeout: float = FILES_TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.token, self.timeout, self.files_timeout = token, timeout, max(timeout, files_timeout)
        self.http = requests.Session()
        self.http.headers.update({"Authorization": f"Bearer {token}", "User-Agent": "ccd-client/0.1"})

    # -- plumbing -----------------------------------------------------------------------------

    def request(self, method: str, path: str, *, key: str | None = None, read_timeout: float | None = None,
                stream: bool = False, headers: dict | None = None, **kwargs) -> requests.Response:
        """Sends one request and returns a successful response, or raises the typed error."""
        headers = dict(headers or {})
        if key is not None:
            headers["Idempotency-Key"] = key
        timeout = (CONNECT_TIMEOUT, read_timeout or self.timeout)
        try:
            resp = self.http.request(method, f"{self.url}/api/v1{path}", headers=headers, timeout=timeout,
                                     stream=stream, **kwargs)
        except requests.RequestException as exc:
            reason = getattr(exc.args[0], "reason", None) if exc.args else None
            raise ConnectionFailed(f"{method} {self.url}/api/v1{path} failed: {reason or exc}") from exc
        if resp.status_code >= 400:
            try:
                raise_for(resp)
            finally:
                resp.close()
        return resp

    def call(self, method: str, path: str, **kwargs) -> dict:
        """Sends one request and returns its JSON body."""
        return self.request(method, path, **kwargs).json()

    # -- sessions -----------------------------------------------------------------------------

    def create_session(self, config: dict | None = None, idempotency_key: str | None = None,
                       workspace: str | dict | None = None) -> dict:
        """Creates a session; its container starts in the background. `workspace` is a persistent
        workspace's name (or the API's workspace object); without it the workspace is ephemeral."""
        body = {"config": config or {}, "workspace": workspace_spec(workspace)}
        return self.call("POST", "/sessions", json=body, key=idempotency_key)

    def list_sessions(self, status: str | None = None, limit: int = 50, offset: int = 0) -> dict:
        """One page of the owner's sessions: {items, total, limit, offset, next_offset}."""
        params = {"limit": limit, "offset": offset, **({"status": status} if status else {})}
        return self.call("GET", "/sessions", params=params)

    def session(self, session_id: str) -> dict:
        """One session, with its latest turn."""
        return self.call("GET", f"/sessions/{session_id}")

    def stop_session(self, session_id: str) -> dict:
        """Stops the session's container; the next chat starts it again."""
        return self.call("POST", f"/sessions/{session_id}/stop")

    def delete_session(self, session_id: str) -> dict:
        """Deletes the session's container, volumes and events."""
        return self.call("DELETE", f"/sessions/{session_id}")

    # -- spawn trees --------------------------------------------------------------------------

    def spawn(self, session_id: str, prompt: str | None = None, config: dict | None = None,
              workspace: str | dict | None = None, idempotency_key: str | None = None) -> dict:
        """Makes a child session of `session_id` (the parent's config with `config`'s keys on top),
        optionally with a first prompt; returns the child, with that first turn as `turn` (or None)."""
        body: dict[str, Any] = {}
        if prompt is not None:
            body["prompt"] = prompt
        if config:
            body["config"] = config
        if workspace is not None:
            body["workspace"] = workspace_spec(workspace)
        return self.call("POST", f"/sessions/{session_id}/spawn", json=body, key=idempotency_key)

    def children(self, session_id: str, recursive: bool = False) -> dict:
        """The session's children, each with its `latest_turn`: {items}; with `recursive`, every
        session below it, each with its own `children`, and the whole tree's cost as `tree_cost_usd`."""
        params = {"recursive": "true" if recursive else "false"}
        return self.call("GET", f"/sessions/{session_id}/children", params=params)

    # -- turns --------------------------------------------------------------------------------

    def chat(self, session_id: str, prompt: str, wait: int | None = None,
             idempotency_key: str | None = None, webhook: str | None = None) -> dict:
        """Queues a turn and returns it; with `wait`, holds up to that many seconds for it to end."""
        body: dict[str, Any] = {"prompt": prompt}
        if wait is not None:
            body["wait"] = wait
        if webhook:
            body["webhook"] = webhook
        return self.call("POST", f"/sessions/{session_id}/chat", json=body, key=idempotency_key,
                         read_timeout=self.timeout + (wait or 0))

    def chat_stream(self, session_id: str, prompt: str, idempotency_key: str | None = None) -> Iterator[Event]:
        """Queues a turn and yields its events as they happen, through its final event; a broken
        stream is resumed from the session's events after the last one seen."""
        body = {"prompt": prompt, "stream": True}
        resp = self.request("POST", f"/sessions/{session_id}/chat", json=body, key=idempotency_key,
                            stream=True, headers={"Accept": "application/x-ndjson"})
        turn_id, last_id = resp.headers.get("X-Turn-Id"), None
        try:
            for line in split_lines(resp.iter_content(chunk_size=None)):
                if line.strip():
                    event = json.loads(line)
                    turn_id, last_id = event.get("turn_id") or turn_id, event.get("id") or last_id
                    yield event
                    if event.get("type") in FINAL_EVENT_TYPES:
                        return
            return  # ended by the server without a final event: the turn is over, its end trimmed
        except READ_ERRORS:
            pass  # the connection broke: resume below
        finally:
            resp.close()
        if turn_id:
            yield from self.turn_events(session_id, turn_id, last_id)

    def turn_events(self, session_id: str, turn_id: str, since: str | None = None) -> Iterator[Event]:
        """A turn's events from the session's live stream after `since`, through its final event."""
        if since is None:
            queued = self.turn(turn_id).get("queued_event_id")
            since = id_before(queued) if queued else None  # so turn.queued is included
        with self.events(session_id, since=since) as follower:
            for event in follower:
                if event.get("turn_id") == turn_id:
                    yield event
                    if event.get("type") in FINAL_EVENT_TYPES:
                        return
                elif event.get("type") == "stream.gap" and self.turn(turn_id)["status"] in FINISHED_TURN_STATUSES:
                    return

    def turn(self, turn_id: str) -> dict:
        """One turn as it is now."""
        return self.call("GET", f"/turns/{turn_id}")

    def turns(self, session_id: str, limit: int = 50, offset: int = 0) -> dict:
        """One page of a session's turns, oldest first."""
        return self.call("GET", f"/sessions/{session_id}/turns", params={"limit": limit, "offset": offset})

    def cancel(self, turn_id: str) -> dict:
        """Cancels a queued turn at once, or asks a running one to stop; Conflict if it already ended."""
        return self.call("POST", f"/turns/{turn_id}/cancel")

    def wait_turn(self, turn_id: str, timeout: float = 300, interval: float = 0.5) -> dict:
        """Waits for the turn to end and returns it; TimeoutError after `timeout` seconds. The server
        holds each request (?wait=) until the turn ends; `interval` spaces out the requests it
        answers early without the turn having ended."""
        deadline = time.monotonic() + timeout
        while True:
            hold = int(min(LONG_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
            asked = time.monotonic()
            turn = self.call("GET", f"/turns/{turn_id}", params={"wait": hold}, read_timeout=self.timeout + hold)
            if turn["status"] in FINISHED_TURN_STATUSES:
                return turn
            now = time.monotonic()
            if now >= deadline:
                raise TimeoutError(f"turn {turn_id} still {turn['status']} after {timeout:.0f}s")
            if hold == 0 or now - asked < hold:  # answered without holding the whole time: do not spin
                time.sleep(min(interval, max(0.0, deadline - now)))

    # -- tool approvals -----------------------------------------------------------------------

    def approvals(self, turn_id: str) -> list[dict]:
        """The turn's tool approvals (Claude Code's permission prompts), pending and answered, oldest first."""
        return self.call("GET", f"/turns/{turn_id}/approvals")["approvals"]

    def answer_approval(self, turn_id: str, request_id: str, behavior: str, updated_input: dict | None = None,
                        message: str | None = None, remember: bool = False) -> dict:
        """Answers one of the turn's pending approvals: `behavior` "allow" (optionally running the tool
        with `updated_input` instead, and with `remember` allowing it for the rest of the session) or
        "deny" (`message` is what the model is told). Returns the answered approval; Conflict
        (`approval_resolved`) when it was already answered or timed out, NotFound for an unknown one."""
        body: dict[str, Any] = {"behavior": behavior}
        if updated_input is not None:
            body["updated_input"] = updated_input
        if message is not None:
            body["message"] = message
        if remember:
            body["remember"] = True
        return self.call("POST", f"/turns/{turn_id}/approvals/{quote(request_id, safe='')}", json=body)

    # -- events -------------------------------------------------------------------------------

    def events(self, session_id: str, since: str | None = None) -> "EventFollower":
        """Follows the session's events live (SSE) after `since`, reconnecting when dropped."""
        return EventFollower(self, session_id, since)

    def events_page(self, session_id: str, since: str | None = None, limit: int = 100) -> dict:
        """One page of past events: {items, next_since, has_more}."""
        params = {"limit": limit, **({"since": since} if since else {})}
        return self.call("GET", f"/sessions/{session_id}/events", params=params)

    # -- workspace files ----------------------------------------------------------------------

    def download_workspace(self, session_id: str, path: str | os.PathLike) -> int:
        """Streams the session's whole workspace, as tar.gz, into the local file `path`; returns
        the bytes written. The file appears only once the download is complete."""
        return self._download(f"/sessions/{session_id}/workspace", path)

    def upload_workspace(self, session_id: str, tar_path: str | os.PathLike) -> dict:
        """Streams a local tar (gzipped or not) to the session, which unpacks it into its workspace:
        {files, bytes}. Only files and directories; an archive that holds anything else writes nothing."""
        with open(tar_path, "rb") as archive:
            return self.call("POST", f"/sessions/{session_id}/workspace", data=archive,
                             headers={"Content-Type": "application/octet-stream"},
                             read_timeout=self.files_timeout)

    def get_file(self, session_id: str, remote_path: str) -> bytes:
        """One workspace file's content (`remote_path` is relative to /workspace), held in memory;
        download_file streams a big one to disk instead."""
        return self.request("GET", file_path(session_id, remote_path), read_timeout=self.files_timeout).content

    def download_file(self, session_id: str, remote_path: str, dest: str | os.PathLike | IO[bytes]) -> int:
        """Streams one workspace file into `dest`, a local path (which appears once it is complete)
        or a binary file object; returns the bytes written."""
        return self._download(file_path(session_id, remote_path), dest)

    def put_file(self, session_id: str, remote_path: str, data: bytes | str | os.PathLike | IO[bytes]) -> dict:
        """Writes one workspace file, making its directories: `data` is the content (bytes), a local
        file's path or a binary file object, streamed. Returns {path, bytes}."""
        if isinstance(data, (bytes, bytearray, memoryview)) or hasattr(data, "read"):
            return self._put(session_id, remote_path, data)
        with open(data, "rb") as source:
            return self._put(session_id, remote_path, source)

    def _put(self, session_id: str, remote_path: str, body: Any) -> dict:
        return self.call("PUT", file_path(session_id, remote_path), data=body,
                         headers={"Content-Type": "application/octet-stream"}, read_timeout=self.files_timeout)

    def _download(self, path: str, dest: str | os.PathLike | IO[bytes]) -> int:
        """GETs `path` and streams its body into `dest` (a local path or a binary file object)."""
        if hasattr(dest, "write"):
            return self._copy_body(path, dest)  # type: ignore[arg-type]
        target = Path(dest)
        partial = target.with_name(target.name + ".part")
        try:
            with partial.open("wb") as out:
                written = self._copy_body(path, out)
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        return written

    def _copy_body(self, path: str, out: IO[bytes]) -> int:
        """Copies a response body into `out` chunk by chunk; ConnectionFailed if it breaks or ends short."""
        resp = self.request("GET", path, stream=True, read_timeout=self.files_timeout)
        written = 0
        try:
            chunks = resp.iter_content(chunk_size=CHUNK_BYTES)
            while True:
                try:
                    chunk = next(chunks, None)
                except READ_ERRORS as exc:  # only the reading: a local write error stays an OSError
                    raise ConnectionFailed(f"GET {self.url}/api/v1{path} broke after {written} bytes: {exc}") from exc
                if chunk is None:
                    break
                out.write(chunk)
                written += len(chunk)
        finally:
            resp.close()
        expected = resp.headers.get("Content-Length", "")
        if expected.isdigit() and not resp.headers.get("Content-Encoding") and int(expected) != written:
            raise ConnectionFailed(f"GET {self.url}/api/v1{path} ended after {written} of {expected} bytes")
        return written

    # -- batches ------------------------------------------------------------------------------

    def create_batch(self, items: list[dict], concurrency: int = 4, idempotency_key: str | None = None,
                     webhook: str | None = None) -> dict:
        """Submits many prompts at once; each item has a prompt and a session_id or a config."""
        return self.call("POST", "/batches", data=batch_body(items, concurrency, webhook),
                         headers={"Content-Type": "application/json"}, key=idempotency_key)

    def list_batches(self, limit: int = 50, offset: int = 0) -> dict:
        """One page of the owner's batches, newest first."""
        return self.call("GET", "/batches", params={"limit": limit, "offset": offset})

    def batch(self, batch_id: str) -> dict:
        """One batch with its counts and progress."""
        return self.call("GET", f"/batches/{batch_id}")

    def cancel_batch(self, batch_id: str) -> dict:
        """Cancels every item of the batch that has not finished."""
        return self.call("POST", f"/batches/{batch_id}/cancel")

    def batch_results(self, batch_id: str, follow: bool = True) -> Iterator[dict]:
        """The batch's finished items, one dict each; with `follow`, waits for the rest as they
        finish, reconnecting when the connection drops (items already yielded are skipped)."""
        seen: set[int] = set()
        failures = 0
        while True:
            before = len(seen)
            try:
                yield from self._result_lines(batch_id, follow, seen)
                return
            except (ConnectionFailed, Unavailable):
                failures = 1 if len(seen) > before else failures + 1
                if failures > MAX_RECONNECTS:
                    raise
                time.sleep(backoff(failures - 1))

    def _result_lines(self, batch_id: str, follow: bool, seen: set[int]) -> Iterator[dict]:
        """One pass over the results endpoint; ConnectionFailed when the stream breaks."""
        params = {"follow": "true" if follow else "false"}
        resp = self.request("GET", f"/batches/{batch_id}/results", params=params, stream=True)
        try:
            for line in split_lines(resp.iter_content(chunk_size=None)):
                if line.strip():
                    item = json.loads(line)
                    if item["index"] not in seen:
                        seen.add(item["index"])
                        yield item
        except READ_ERRORS as exc:
            raise ConnectionFailed(f"results of batch {batch_id}: {exc}") from exc
        finally:
            resp.close()


def batch_body(items: list[dict], concurrency: int, webhook: str | None = None) -> bytes:
    """The exact JSON body of a batch submission (stable, so it can be hashed for a key)."""
    body: dict[str, Any] = {"items": items, "concurrency": concurrency}
    if webhook:
        body["webhook"] = webhook
    return json.dumps(body, separators=(",", ":"), sort_keys=True).encode()


def workspace_spec(workspace: str | dict | None) -> dict:
    """The API's workspace object: ephemeral for None, persistent for a name, else as given."""
    if workspace is None:
        return {"type": "ephemeral"}
    if isinstance(workspace, str):
        return {"type": "persistent", "name": workspace}
    return workspace


def file_path(session_id: str, remote_path: str) -> str:
    """The API path of one workspace file. An absolute path or a `..` part is refused here, as the
    server would if it saw them: HTTP clients resolve `..` in a URL, and the server redirects
    `files//x` to `files/x`, so such a request would reach another file."""
    parts = remote_path.split("/")
    if remote_path.startswith("/") or ".." in parts:
        message = f"{remote_path!r} is not a path inside the workspace: give a relative path without '..'"
        raise ValidationError(0, "invalid_path", message,
                              {"error": {"code": "invalid_path", "message": message, "field": "path"}})
    return f"/sessions/{session_id}/workspace/files/{quote(remote_path, safe='/')}"


def new_idempotency_key() -> str:
    """A fresh random key for one logical request and its retries."""
    return str(uuid.uuid4())
