"""A small typed client for the cc-docker HTTP API (sessions, chat, events, turns, batches)."""
from __future__ import annotations

import json
import socket
import time
import uuid
from typing import Any, Callable, Iterator

import requests

Event = dict[str, Any]
FINAL_EVENT_TYPES = frozenset({"turn.completed", "turn.failed", "turn.cancelled"})
FINISHED_TURN_STATUSES = frozenset({"succeeded", "failed", "cancelled", "timed_out"})
CONNECT_TIMEOUT = 10.0
MAX_RECONNECTS = 8  # consecutive failed attempts before a follower gives up
READ_ERRORS = (requests.RequestException, OSError, ValueError)


class ApiError(Exception):
    """An error answer of the API, or a failure to reach it, with the parsed error body."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})" if status else f"{message} ({code})")
        self.status, self.code, self.message, self.body = status, code, message, body or {}

    @property
    def field(self) -> str | None:
        """The request field the error names, when it names one."""
        return self.body.get("error", {}).get("field")


class ValidationError(ApiError):
    """The request was malformed or refused (400, 413, 415, 422)."""


class Unauthorized(ApiError):
    """The token is missing, invalid or expired (401, 403)."""


class NotFound(ApiError):
    """No such resource for this token's owner (404)."""


class Conflict(ApiError):
    """The resource is in the wrong state, e.g. the turn already ended (409)."""


class OverLimit(ApiError):
    """The owner is at a limit; retry after `retry_after` seconds (429)."""

    def __init__(self, status: int, code: str, message: str, body: dict | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(status, code, message, body)
        self.retry_after = retry_after


class Unavailable(ApiError):
    """The server failed or one of its dependencies is down (5xx)."""


class ConnectionFailed(ApiError):
    """The server could not be reached, or the connection broke."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "connection_failed", message)


def error_class(status: int) -> type[ApiError]:
    """The exception class for an HTTP error status."""
    if status in (401, 403):
        return Unauthorized
    if status == 404:
        return NotFound
    if status == 409:
        return Conflict
    if status >= 500:
        return Unavailable
    if status >= 400:
        return ValidationError
    return ApiError


def raise_for(resp: requests.Response) -> None:
    """Raises the typed error an error response describes; does nothing for a success."""
    if resp.status_code < 400:
        return
    try:
        body = resp.json()
    except ValueError:
        body = {}
    error = body.get("error") if isinstance(body, dict) else None
    error = error if isinstance(error, dict) else {}
    code = error.get("code") or f"http_{resp.status_code}"
    message = error.get("message") or (resp.text[:200].strip() or resp.reason or "request failed")
    if resp.status_code == 429:
        raise OverLimit(resp.status_code, code, message, body, retry_after_of(resp, error))
    raise error_class(resp.status_code)(resp.status_code, code, message, body)


def retry_after_of(resp: requests.Response, error: dict) -> float | None:
    """Seconds to wait before retrying, from the Retry-After header or the body."""
    value = resp.headers.get("Retry-After", error.get("retry_after"))
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def stream_id_key(event_id: str) -> tuple[int, int]:
    """A Redis stream id ("1732450000000-0") as a sortable pair."""
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def id_before(event_id: str) -> str:
    """The greatest stream id before `event_id`."""
    ms, seq = stream_id_key(event_id)
    return f"{ms}-{seq - 1}" if seq else f"{ms - 1}-{2 ** 64 - 1}"


def split_lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Complete text lines from a byte stream, as they arrive (a partial last line is dropped)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.rstrip(b"\r").decode("utf-8", "replace")


def sse_events(lines: Iterator[str]) -> Iterator[Event | None]:
    """Parsed SSE frames: each `data:` envelope as a dict, None for a heartbeat or other frame."""
    data: list[str] = []
    for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif line == "":
            if data:
                yield json.loads("\n".join(data))
                data = []
            else:
                yield None
    # A frame cut off by a dropped connection is discarded: it is read again after reconnecting.


def break_connection(resp: requests.Response | None) -> None:
    """Shuts the response's socket down, as a network failure would; its reader sees the stream
    break (closing the response instead would fail the reader with an AttributeError)."""
    if resp is None:
        return
    sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
    if sock is None:
        resp.close()
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already gone


class Client:
    """The cc-docker API at `url`, called with a bearer `token`; `timeout` bounds each request."""

    def __init__(self, url: str, token: str, timeout: float = 30) -> None:
        self.url = url.rstrip("/")
        self.token, self.timeout = token, timeout
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

    def create_session(self, config: dict | None = None, idempotency_key: str | None = None) -> dict:
        """Creates a session with an ephemeral workspace; its container starts in the background."""
        body = {"config": config or {}, "workspace": {"type": "ephemeral"}}
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
        """Polls the turn until it ends and returns it; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            turn = self.turn(turn_id)
            if turn["status"] in FINISHED_TURN_STATUSES:
                return turn
            if time.monotonic() >= deadline:
                raise TimeoutError(f"turn {turn_id} still {turn['status']} after {timeout:.0f}s")
            time.sleep(min(interval, max(0.0, deadline - time.monotonic())))

    # -- events -------------------------------------------------------------------------------

    def events(self, session_id: str, since: str | None = None) -> "EventFollower":
        """Follows the session's events live (SSE) after `since`, reconnecting when dropped."""
        return EventFollower(self, session_id, since)

    def events_page(self, session_id: str, since: str | None = None, limit: int = 100) -> dict:
        """One page of past events: {items, next_since, has_more}."""
        params = {"limit": limit, **({"since": since} if since else {})}
        return self.call("GET", f"/sessions/{session_id}/events", params=params)

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


def backoff(attempt: int) -> float:
    """Seconds to wait before reconnect attempt `attempt` (0 = at once)."""
    return 0.0 if attempt == 0 else min(5.0, 0.25 * 2 ** attempt)


class EventFollower:
    """An iterator over a session's events, live over SSE, that survives dropped connections.

    Each reconnect sends Last-Event-ID (the last id seen), and ids at or before it are skipped,
    so nothing is lost or repeated. It ends when the session is deleted; `drop()` breaks the
    current connection (as a network failure would), `close()` ends the iteration.
    """

    def __init__(self, client: Client, session_id: str, since: str | None = None) -> None:
        self.client, self.session_id, self.last_id = client, session_id, since
        self.response: requests.Response | None = None
        self.connects = 0
        self.on_connect: Callable[["EventFollower"], None] | None = None
        self._closed = False
        self._events = self._follow()

    def __iter__(self) -> "EventFollower":
        return self

    def __next__(self) -> Event:
        return next(self._events)

    def __enter__(self) -> "EventFollower":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def drop(self) -> None:
        """Breaks the current connection; the iteration reconnects and carries on."""
        break_connection(self.response)

    def close(self) -> None:
        """Ends the iteration and its connection."""
        self._closed = True
        break_connection(self.response)
        try:
            self._events.close()
        except ValueError:
            pass  # closed from another thread while it reads: it stops at its next check

    def _follow(self) -> Iterator[Event]:
        failures = 0
        while not self._closed:
            try:
                resp = self._connect()
            except (ConnectionFailed, Unavailable):
                if failures >= MAX_RECONNECTS:
                    raise
                time.sleep(backoff(failures + 1))
                failures += 1
                continue
            for event in self._read(resp):
                failures = 0
                yield event
            if self._closed or self._session_gone():
                return
            failures += 1
            time.sleep(backoff(failures - 1))

    def _connect(self) -> requests.Response:
        """Opens the SSE stream after the last id seen."""
        headers = {"Accept": "text/event-stream"}
        if self.last_id:
            headers["Last-Event-ID"] = self.last_id
        self.response = self.client.request("GET", f"/sessions/{self.session_id}/events", stream=True,
                                            headers=headers)
        self.connects += 1
        if self.on_connect is not None:
            self.on_connect(self)
        return self.response

    def _read(self, resp: requests.Response) -> Iterator[Event]:
        """The new events of one connection, until it ends or breaks."""
        try:
            for event in sse_events(split_lines(resp.iter_content(chunk_size=None))):
                if event is not None and self._is_new(event):
                    yield event
        except READ_ERRORS:
            pass
        finally:
            resp.close()

    def _is_new(self, event: Event) -> bool:
        """Records the event's id; False for an event at or before the last one seen."""
        event_id = event.get("id")
        if not event_id:
            return True  # stream.gap carries no id
        if self.last_id and stream_id_key(event_id) <= stream_id_key(self.last_id):
            return False
        self.last_id = event_id
        return True

    def _session_gone(self) -> bool:
        """True when the stream ended because the session was deleted."""
        try:
            return self.client.session(self.session_id)["status"] == "deleted"
        except NotFound:
            return True
        except (ConnectionFailed, Unavailable):
            return False


def new_idempotency_key() -> str:
    """A fresh random key for one logical request and its retries."""
    return str(uuid.uuid4())
