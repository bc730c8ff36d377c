"""The in-container MCP server "ccd": the protocol side (the tools are in wrapper/spawn_tools.py).

Started by Claude Code from the config `wrapper run` writes: `python3 -m wrapper mcp`.
It speaks MCP over stdio (JSON-RPC 2.0, one message per line; logs go to stderr only).
A failed tool call becomes a tool result with isError set, never a crash.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import threading
import time
from typing import Any

from wrapper.spawn_tools import TOOLS, Api, Progress, call_tool

log = logging.getLogger("ccd.mcp")
SERVER_INFO = {"name": "ccd", "version": "1.0.0"}
PROTOCOL_VERSIONS = ("2025-06-18", "2025-03-26", "2024-11-05")  # newest first
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL_ERROR = (
    -32700, -32600, -32601, -32602, -32603)


class RpcError(Exception):
    """A failure of the request itself: it becomes a JSON-RPC error response."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Server:
    """Reads requests from `reader`, answers on `writer`; tool calls run in their own threads."""

    def __init__(self, api: Api, reader, writer) -> None:
        self.api = api
        self.reader = reader
        self.writer = writer
        self._write_lock = threading.Lock()
        self._cancelled: set = set()
        self._calls: list[threading.Thread] = []

    def serve(self) -> None:
        """Answers until stdin closes, then gives running tool calls a moment to answer."""
        for raw in self.reader:
            if raw.strip():
                self.handle_line(raw)
        deadline = time.monotonic() + 5
        for thread in self._calls:
            thread.join(max(0.0, deadline - time.monotonic()))

    def send(self, message: dict) -> None:
        line = json.dumps(message) + "\n"
        with self._write_lock:
            self.writer.write(line.encode())
            self.writer.flush()

    def handle_line(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
        except ValueError:
            self.send(error_response(None, PARSE_ERROR, "parse error: a line is not a JSON message"))
            return
        if not isinstance(message, dict) or not isinstance(message.get("method"), str):
            if isinstance(message, dict) and "method" not in message and ("result" in message or "error" in message):
                return  # a response to a request we never make: nothing to do
            ident = message.get("id") if isinstance(message, dict) else None
            self.send(error_response(ident, INVALID_REQUEST, "invalid request: expected an object with a method"))
            return
        ident, method, params = message.get("id"), message["method"], message.get("params") or {}
        if "id" not in message:  # a notification: never answered
            self.notice(method, params)
            return
        if not isinstance(ident, (str, int)) or isinstance(ident, bool):
            self.send(error_response(None, INVALID_REQUEST, "invalid request: the id must be a string or number"))
            return
        if method == "tools/call":
            # In a thread: waiting for a child can take an hour, and the model may wait on several at once.
            thread = threading.Thread(target=self.answer, args=(ident, method, params), daemon=True)
            self._calls = [t for t in self._calls if t.is_alive()] + [thread]
            thread.start()
        else:
            self.answer(ident, method, params)

    def notice(self, method: str, params: dict) -> None:
        """Notifications get no reply; a cancelled request's answer is dropped."""
        if method == "notifications/cancelled" and isinstance(params, dict):
            request_id = params.get("requestId")
            if isinstance(request_id, (str, int)):
                self._cancelled.add(request_id)

    def answer(self, ident: Any, method: str, params: Any) -> None:
        try:
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object")
            response = {"jsonrpc": "2.0", "id": ident, "result": self.dispatch(method, params)}
        except RpcError as exc:
            response = error_response(ident, exc.code, exc.message)
        except Exception as exc:
            log.exception("%s failed", method)
            response = error_response(ident, INTERNAL_ERROR, f"internal error: {exc!r}")
        if ident in self._cancelled:
            self._cancelled.discard(ident)
            return
        self.send(response)

    def dispatch(self, method: str, params: dict) -> dict:
        if method == "initialize":
            asked = params.get("protocolVersion")
            version = asked if asked in PROTOCOL_VERSIONS else PROTOCOL_VERSIONS[0]
            return {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": SERVER_INFO,
                    "instructions": "Tools to spawn child Claude Code sessions, give them prompts, "
                                    "wait for their results and list them."}
        if method == "ping":
            return {}
        if method == "tools/list":
            return {"tools": [{"name": name, "description": description, "inputSchema": spec}
                              for name, (description, spec, _) in TOOLS.items()]}
        if method == "tools/call":
            name = params.get("name")
            if name not in TOOLS:
                raise RpcError(INVALID_PARAMS, f"unknown tool: {name}")
            return call_tool(self.api, name, params.get("arguments") or {}, self.progress_sender(params))
        raise RpcError(METHOD_NOT_FOUND, f"method not found: {method}")


    def progress_sender(self, params: dict) -> Progress:
        """Progress notifications for the request, when its client asked for them with a progressToken."""
        meta = params.get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        if not isinstance(token, (str, int)) or isinstance(token, bool):
            return lambda message: None
        count = itertools.count(1)

        def send(message: str) -> None:
            self.send({"jsonrpc": "2.0", "method": "notifications/progress",
                       "params": {"progressToken": token, "progress": next(count), "message": message}})

        return send


def error_response(ident: Any, code: int, message: str) -> dict:
    return {"jsonrpc": "2.0", "id": ident, "error": {"code": code, "message": message}}


def main(argv: list[str]) -> int:
    """`python3 -m wrapper mcp`: serve MCP on stdin/stdout until stdin closes."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="ccd-mcp: %(message)s")
    if argv:
        print(f"usage: python3 -m wrapper mcp (unexpected arguments: {' '.join(argv)})", file=sys.stderr)
        return 2
    api = Api.from_env(dict(os.environ))
    log.info("serving for session %s against %s", api.session_id or "?", api.base_url or "(no CCD_API_URL)")
    Server(api, sys.stdin.buffer, sys.stdout.buffer).serve()
    return 0
