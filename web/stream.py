"""The WebSocket: a session's events (replay from ?since, then live), and chat/cancel commands.

Client → server, JSON text frames:
    {"type": "chat", "prompt": "...", "id": "<optional, echoed>"}
    {"type": "cancel", "turn_id": "...", "id": "<optional, echoed>"}
Server → client: every event envelope, plus one reply per command:
    {"type": "reply", "id": .., "ok": true, "turn": {..}}   or   {"type": "reply", "id": .., "ok": false, "error": {code, message}}
Heartbeats are WebSocket pings every CCD_WS_PING_SECONDS; clients answer them automatically.
When Redis stays away the socket closes with 1011; reconnect with ?since=<the last id received>.
"""
from __future__ import annotations

import contextvars
import json
import logging
import threading

from flask import current_app, g, request
from flask_sock import ConnectionClosed, Sock
from pydantic import ValidationError

from core.errors import DomainError
from web.api import api
from web.context import ctx
from web.follow import StreamInterrupted, tail
from web.metrics import LagMeter
from web.routes.events import session_alive
from web.routes.turns import cancel, submit_chat
from web.schemas import ChatRequest

log = logging.getLogger(__name__)
sock = Sock()


class Socket:
    """Serialises sends: the event loop and the command thread both write to the client."""

    def __init__(self, ws) -> None:
        self.ws, self.lock = ws, threading.Lock()

    def send(self, text: str) -> None:
        with self.lock:
            self.ws.send(text)


def handle_command(owner: str, session_id: str, raw: str) -> dict:
    """Runs one client command and returns its reply."""
    try:
        message = json.loads(raw)
    except ValueError:
        message = None
    if not isinstance(message, dict):
        return {"type": "reply", "id": None, "ok": False,
                "error": {"code": "invalid_json", "message": "send JSON objects with a type"}}
    reply = {"type": "reply", "id": message.get("id")}
    try:
        if message.get("type") == "chat":
            spec = ChatRequest.model_validate({k: v for k, v in message.items() if k in ("prompt", "webhook")})
            return {**reply, "ok": True, "turn": submit_chat(owner, session_id, spec)}
        if message.get("type") == "cancel":
            body, _ = cancel(owner, str(message.get("turn_id")))
            if body["session_id"] != session_id:
                raise DomainError("that turn belongs to another session", code="wrong_session")
            return {**reply, "ok": True, "turn": body}
        raise DomainError("type must be chat or cancel", code="unknown_command")
    except ValidationError as exc:
        first = exc.errors()[0]
        error = {"code": "validation_error", "message": f"{'.'.join(map(str, first['loc']))}: {first['msg']}"}
    except DomainError as exc:
        error = {"code": exc.code, "message": exc.message}
    except Exception:  # the socket stays up; the failure is logged
        log.exception("websocket command failed")
        error = {"code": "internal_error", "message": "the command failed; it was logged"}
    return {**reply, "ok": False, "error": error}


def serve_commands(app, socket: Socket, owner: str, session_id: str) -> None:
    """Reads client frames until the socket closes, answering each command."""
    with app.app_context():
        try:
            while True:
                raw = socket.ws.receive()
                if raw is None:
                    continue
                socket.send(json.dumps(handle_command(owner, session_id, raw)))
        except ConnectionClosed:
            return


@sock.route("/sessions/<session_id>/stream", bp=api, endpoint="stream")
def stream(ws, session_id: str) -> None:
    """Sends every event after `since` exactly once, in order; auth ran in api.before_request."""
    socket = Socket(ws)
    # In a copy of this context: the commands' log lines (and the turns they send) carry the request's ids.
    commands = threading.Thread(target=contextvars.copy_context().run, name=f"ws-commands-{session_id[:8]}",
                                daemon=True, args=(serve_commands, current_app._get_current_object(), socket,
                                                   g.owner, session_id))
    commands.start()
    lag = LagMeter("ws")
    try:
        for event in tail(ctx().events, session_id, request.args.get("since"), session_alive(session_id)):
            if event is not None:
                socket.send(event.to_json())
                lag.delivered(event)
            elif not ws.connected:
                return
        ws.close(reason=1000, message="session deleted")
    except StreamInterrupted as exc:  # 1011: try again later, with since=<the last id received>
        log.warning("stream of session %s ended: %s", session_id, exc)
        ws.close(reason=1011, message=str(exc))
    except ConnectionClosed:
        log.debug("stream client of session %s went away", session_id)
