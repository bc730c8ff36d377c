"""The WebSocket: a session's events (replay from ?since, then live), and chat/cancel commands.

Client → server, JSON text frames:
    {"type": "chat", "prompt": "...", "id": "<optional, echoed>"}
    {"type": "cancel", "turn_id": "...", "id": "<optional, echoed>"}
    {"type": "approve", "turn_id": "...", "request_id": "...", "behavior": "allow" | "deny",
     "updated_input": {..}?, "message": "..."?, "remember": bool?, "id": "<optional, echoed>"}
        answers a permission prompt as POST /turns/{id}/approvals/{request_id} does (any turn of the owner's,
        a child session's too; a session token may not); the reply carries "approval": {..}
Server → client: every event envelope, plus one reply per command:
    {"type": "reply", "id": .., "ok": true, "turn": {..}}   or   {"type": "reply", "id": .., "ok": false, "error": {code, message}}
Heartbeats are WebSocket pings every CCD_WS_PING_SECONDS; clients answer them automatically.
When Redis stays away the socket closes with 1011; reconnect with ?since=<the last id received>.
A client that falls more than CCD_STREAM_BUFFER_EVENTS events behind is closed with 4008 and the reason
"slow client: more than N events behind; resume with since=<the last id it was sent>".
The token is checked again on every command and every TOKEN_CHECK_SECONDS: once it expires or is revoked, or
a session token's session stops, the command is refused and the socket closes with 4401 "<code>: <why>".
"""
from __future__ import annotations

import contextvars
import json
import logging
import select
import socket
import struct
import threading
import time
from typing import Iterator

from flask import current_app, g, request
from flask_sock import ConnectionClosed, Sock
from pydantic import ValidationError
from sqlalchemy.exc import SQLAlchemyError
from wsproto.events import TextMessage

from core.envelope import Event
from core.errors import DomainError, NotFound, Unauthorized
from web.api import api, revocations
from web.auth import recheck
from web.context import ctx
from web.follow import StreamInterrupted, tail_batches
from web.hub import SlowClient, frame_json
from web.metrics import STREAM_DROPPED, LagMeter
from web.routes.approvals import answer
from web.routes.events import session_alive
from web.routes.turns import cancel, submit_chat
from web.schemas import ApprovalAnswer, ChatRequest

log = logging.getLogger(__name__)
sock = Sock()
SLOW_CLIENT_CLOSE = 4008  # a private close code (4000-4999): the client fell too far behind; resume with since=
TOKEN_ENDED_CLOSE = 4401  # the token that opened the socket is no longer good (expired, revoked, its session ended)
TOKEN_CHECK_SECONDS = 2.0
CHUNK_BYTES = 64 * 1024
ANSWER_FIELDS = frozenset(ApprovalAnswer.model_fields)  # of an approve command's keys, those that are the answer


class Socket:
    """One client's connection: every write (events, replies, and the library's pings, pongs and close)
    goes through one lock and whole, within CCD_STREAM_SEND_TIMEOUT_SECONDS; events are framed once per event."""

    def __init__(self, ws, send_timeout: float) -> None:
        self.ws, self.lock, self.raw, self.send_timeout = ws, threading.Lock(), ws.sock, send_timeout
        # simple_websocket writes with a bare send(): partial writes and its pings could split our frames.
        ws.sock = GuardedSocket(self)
        proto = getattr(getattr(ws.ws, "connection", None), "_proto", None)
        # Unmasked, uncompressed server frames are the same bytes for every client; a client that
        # negotiated permessage-deflate (browsers do) gets its frames from wsproto instead.
        self.shared_frames = proto is not None and not proto.extensions

    def send(self, text: str) -> None:
        """Sends one text message (a command's reply)."""
        self.check_open()
        self.write([self.ws.ws.send(TextMessage(data=text))])

    def send_events(self, events: list[Event]) -> None:
        """Sends each event as one text message, in as few writes as their size allows."""
        self.check_open()
        if self.shared_frames:
            frames = [event_frame(event) for event in events]
        else:
            frames = [self.ws.ws.send(TextMessage(data=frame_json(event))) for event in events]
        self.write(frames)

    def check_open(self) -> None:
        if not self.ws.connected:
            raise ConnectionClosed(self.ws.close_reason, self.ws.close_message)

    def write(self, frames: list[bytes]) -> None:
        with self.lock:
            for chunk in chunks(frames):
                send_within(self.raw, chunk, self.send_timeout)

    def close(self, code: int, message: str) -> None:
        """Closes with a code and reason; a client that takes nothing more is cut off instead."""
        try:
            self.ws.close(reason=code, message=message)
        except TimeoutError:
            self.abort()
        except (ConnectionClosed, OSError):
            pass  # it went away first

    def abort(self) -> None:
        """Drops the connection without a close frame (the client takes nothing more)."""
        self.ws.connected = False
        try:
            self.raw.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # already gone


class GuardedSocket:
    """What simple_websocket sees as its socket: sends go through the Socket's lock, whole."""

    def __init__(self, owner: Socket) -> None:
        self.owner = owner

    def send(self, data: bytes) -> int:
        self.owner.write([data])
        return len(data)

    def __getattr__(self, name: str):
        return getattr(self.owner.raw, name)


def event_frame(event: Event) -> bytes:
    """The event as one unmasked text frame, built once per event however many clients get it."""
    frame = event.__dict__.get("_ws_frame")
    if frame is None:
        payload = frame_json(event).encode()
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x81, size)
        elif size < 65536:
            head = struct.pack("!BBH", 0x81, 126, size)
        else:
            head = struct.pack("!BBQ", 0x81, 127, size)
        frame = event.__dict__["_ws_frame"] = head + payload  # the dataclass is frozen; its __dict__ is not
    return frame


def chunks(frames: list[bytes]) -> Iterator[bytes]:
    """Small frames joined into writes of up to CHUNK_BYTES; a big frame is written on its own (no copy)."""
    pending: list[bytes] = []
    size = 0
    for frame in frames:
        if pending and size + len(frame) > CHUNK_BYTES:
            yield b"".join(pending) if len(pending) > 1 else pending[0]
            pending, size = [], 0
        pending.append(frame)
        size += len(frame)
    if pending:
        yield b"".join(pending) if len(pending) > 1 else pending[0]


def send_within(sock, data: bytes, seconds: float) -> None:
    """sendall(), but TimeoutError when the client takes none of it for `seconds`."""
    view, deadline = memoryview(data), time.monotonic() + seconds
    cooperative = hasattr(sock, "_write_event")  # a gevent socket: send(timeout=0.0) is its non-blocking send
    while view:
        try:
            sent = sock.send(view, 0, 0.0) if cooperative else sock.send(view, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        view = view[sent:]
        if sent:
            deadline = time.monotonic() + seconds
        if view:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the client took nothing for {seconds:.0f} s")
            poller = select.poll()  # gevent's under gevent; no FD_SETSIZE limit either way
            poller.register(sock.fileno(), select.POLLOUT)
            poller.poll(left * 1000)


class TokenEnded(Exception):
    """The socket's token stopped being good; the reply is sent, then the socket closes with 4401."""

    def __init__(self, reason: str, reply: dict) -> None:
        super().__init__(reason)
        self.reason, self.reply = reason, reply


def close_reason(exc: DomainError) -> str:
    """'<code>: <message>', within the 123 bytes a close frame's reason may hold."""
    return f"{exc.code}: {exc.message}".encode()[:123].decode(errors="ignore")


def token_check(claims: dict, session_id: str):
    """A check of the socket's token (see recheck) that runs at most every TOKEN_CHECK_SECONDS: the
    close reason once the token is no longer good, else None. A database blip ends no socket."""
    db_factory, revoked = ctx().db, revocations()
    checked = time.monotonic()

    def ended() -> str | None:
        nonlocal checked
        if time.monotonic() - checked < TOKEN_CHECK_SECONDS:
            return None
        checked = time.monotonic()
        try:
            recheck(db_factory, revoked, claims, session_id)
        except (Unauthorized, NotFound) as exc:
            return close_reason(exc)
        except SQLAlchemyError:
            pass
        return None
    return ended


def handle_command(claims: dict, session_id: str, raw: str) -> dict:
    """Runs one client command, once the token is checked again, and returns its reply; TokenEnded
    (carrying the reply) when the token is no longer good."""
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        return {"type": "reply", "id": None, "ok": False,
                "error": {"code": "invalid_json", "message": "send JSON objects with a type"}}
    reply = {"type": "reply", "id": message.get("id")}
    try:
        recheck(ctx().db, revocations(), claims, session_id)
    except (Unauthorized, NotFound) as exc:
        raise TokenEnded(close_reason(exc), {**reply, "ok": False,
                                             "error": {"code": exc.code, "message": exc.message}}) from None
    try:
        if message.get("type") == "chat":
            spec = ChatRequest.model_validate({k: v for k, v in message.items() if k in ("prompt", "webhook")})
            return {**reply, "ok": True, "turn": submit_chat(claims, session_id, spec)}
        if message.get("type") == "cancel":
            body, _ = cancel(claims["sub"], str(message.get("turn_id")), session_id)
            return {**reply, "ok": True, "turn": body}
        if message.get("type") == "approve":
            spec = ApprovalAnswer.model_validate({k: v for k, v in message.items() if k in ANSWER_FIELDS})
            body = answer(claims, str(message.get("turn_id")), str(message.get("request_id")), spec, via="websocket")
            return {**reply, "ok": True, "approval": body}
        raise DomainError("type must be chat, cancel or approve", code="unknown_command")
    except ValidationError as exc:
        first = exc.errors()[0]
        error = {"code": "validation_error", "message": f"{'.'.join(map(str, first['loc']))}: {first['msg']}"}
    except DomainError as exc:
        error = {"code": exc.code, "message": exc.message}
    except Exception:  # the socket stays up; the failure is logged
        log.exception("websocket command failed")
        error = {"code": "internal_error", "message": "the command failed; it was logged"}
    return {**reply, "ok": False, "error": error}


def serve_commands(app, socket: Socket, claims: dict, session_id: str) -> None:
    """Reads client frames until the socket closes, answering each command."""
    with app.app_context():
        try:
            while True:
                raw = socket.ws.receive()
                if raw is None:
                    continue
                try:
                    answer = handle_command(claims, session_id, raw)
                except TokenEnded as ended:
                    socket.send(json.dumps(ended.reply))
                    socket.close(TOKEN_ENDED_CLOSE, ended.reason)
                    return
                socket.send(json.dumps(answer))
        except ConnectionClosed:
            return


@sock.route("/sessions/<session_id>/stream", bp=api, endpoint="stream")
def stream(ws, session_id: str) -> None:
    """Sends every event after `since` exactly once, in order; auth ran in api.before_request."""
    client = Socket(ws, ctx().settings.stream_send_timeout_seconds)
    # In a copy of this context: the commands' log lines (and the turns they send) carry the request's ids.
    commands = threading.Thread(target=contextvars.copy_context().run, name=f"ws-commands-{session_id[:8]}",
                                daemon=True, args=(serve_commands, current_app._get_current_object(), client,
                                                   g.claims, session_id))
    commands.start()
    lag, token_ended = LagMeter("ws"), token_check(g.claims, session_id)
    try:
        for batch in tail_batches(ctx().events, session_id, request.args.get("since"), session_alive(session_id)):
            if batch:
                client.send_events(batch)
                for event in batch:
                    lag.delivered(event)
            elif not ws.connected:
                return
            reason = token_ended()
            if reason is not None:
                log.info("stream of session %s closed: %s", session_id, reason)
                client.close(TOKEN_ENDED_CLOSE, reason)
                return
        client.close(1000, "session deleted")
    except StreamInterrupted as exc:  # 1011: try again later, with since=<the last id received>
        log.warning("stream of session %s ended: %s", session_id, exc)
        client.close(1011, str(exc))
    except SlowClient as exc:  # 4008: it fell behind; what it got is complete, so since=<its last id>
        STREAM_DROPPED.labels("ws").inc()
        log.info("stream of session %s dropped a client: %s", session_id, exc)
        client.close(SLOW_CLIENT_CLOSE, str(exc))
    except TimeoutError as exc:  # it stopped reading mid-frame: no close frame can reach it
        STREAM_DROPPED.labels("ws").inc()
        log.info("stream of session %s dropped a stalled client: %s", session_id, exc)
        client.abort()
    except (ConnectionClosed, OSError):  # OSError: the connection broke under a write
        log.debug("stream client of session %s went away", session_id)
