"""A scripted Anthropic Messages API server: the test fixture the real Claude Code talks to.

The prompt chooses the script. In the newest user message:
  RUN: <command>     reply with a Bash tool_use running <command>
  SAY: <text>        reply with <text>
  FAIL: <status>     answer the request with that HTTP error status
  SLOW: <seconds>    stream the reply's text slowly, over about that many seconds
  WAIT: <seconds>    wait that long before answering at all (no headers yet)
A tool result is answered with "BASH-RESULT: <output>". Anything else gets "OK".

  CALL: <tool name> <json object>    call that tool (e.g. mcp__ccd__spawn_child) with that input
A prompt may hold several CALL lines, made one after another: the n-th once n-1 tool results
have come back since the prompt (the newest user message without tool results). `{{key}}` in
a CALL's JSON is first replaced by that top-level key of the previous tool result (read as
JSON), e.g. `CALL: mcp__ccd__wait_for_child {"session_id": "{{session_id}}"}`. After the last
CALL's result the reply is "TOOL-RESULT: <its text>"; a tool the request does not offer gets
"NO-TOOL: <name>" instead of a call, and a CALL whose input is not a JSON object "BAD-CALL: ...".
Every request body is recorded, so a test can check what the model was sent; every request's method and
target (path and query, whatever the method) in `seen`, and its headers in `heard`, so a test can check what
reached it; and every
answer's model and `usage` (`answers`), so a test can price what the model reported. Usage is worked out from
the request and the reply as the real API reports it: the prompt split into uncached input, cache writes and
cache reads, and output tokens; a stream sends the input and cache counts in `message_start` and the output in
`message_delta`.
"""
from __future__ import annotations

import json
import re
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DIRECTIVE = re.compile(r"^(RUN|SAY|FAIL|SLOW|WAIT):\s*(.+)$", re.MULTILINE)
CALL = re.compile(r"^CALL:[ \t]*(\S+)[ \t]*(.*)$", re.MULTILINE)
PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


def message_text(message: dict[str, Any]) -> str:
    """All the text of one message, whatever its content shape."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    parts = []
    for block in content or []:
        if block.get("type") == "text":
            parts.append(block.get("text", ""))
        elif block.get("type") == "tool_result":
            inner = block.get("content")
            parts.append(inner if isinstance(inner, str) else message_text({"content": inner}))
    return "\n".join(parts)


def tool_results(message: dict[str, Any]) -> list[str]:
    """The outputs of the tool results in a user message."""
    content = message.get("content")
    if not isinstance(content, list):
        return []
    return [
        message_text({"content": [b]}) for b in content if b.get("type") == "tool_result"
    ]


def plan_calls(users: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The next step of the prompt's CALL script, or None when the prompt has no CALL lines."""
    prompt_at = max((i for i, m in enumerate(users) if not tool_results(m)), default=None)
    if prompt_at is None:
        return None
    calls = CALL.findall(message_text(users[prompt_at]))
    if not calls:
        return None
    results = [r for m in users[prompt_at + 1:] for r in tool_results(m)]
    if len(results) >= len(calls):
        return {"text": "TOOL-RESULT: " + results[-1].strip()}
    name, raw = calls[len(results)]
    if name not in {t.get("name") for t in tools}:
        return {"text": f"NO-TOOL: {name}"}
    if results:
        raw = fill_placeholders(raw, results[-1])
    try:
        arguments = json.loads(raw or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        return {"text": f"BAD-CALL: {name} {raw}"}  # a broken script says so rather than failing the request
    return {"tool": arguments, "name": name}


def fill_placeholders(template: str, previous: str) -> str:
    """`{{key}}` becomes that key of the previous tool result's JSON; left as is when there is none."""
    try:
        values = json.loads(previous)
    except ValueError:
        return template
    if not isinstance(values, dict):
        return template

    def value(match: re.Match) -> str:
        if match.group(1) not in values:
            return match.group(0)
        found = values[match.group(1)]
        return found if isinstance(found, str) else json.dumps(found)

    return PLACEHOLDER.sub(value, template)


def plan_reply(body: dict[str, Any]) -> dict[str, Any]:
    """Decide the reply to one request: an error status, text, or a tool call."""
    # Claude Code may append a system-role message after the prompt: read the newest user one.
    users = [m for m in body.get("messages") or [] if m.get("role") == "user"]
    if body.get("tools"):
        script = plan_calls(users, body["tools"])
        if script is not None:
            return script
    last = users[-1] if users else {"content": ""}
    results = tool_results(last)
    if results:
        return {"text": "BASH-RESULT: " + " ".join(r.strip() for r in results)}
    directives = DIRECTIVE.findall(message_text(last))
    if not directives or not body.get("tools"):
        # Side requests (titles, summaries) carry no tools: a plain answer serves them.
        return {"text": "OK"}
    kind, arg = directives[-1]
    arg = arg.strip()
    if kind == "RUN":
        return {"tool": {"command": arg, "description": "scripted"}}
    if kind == "FAIL":
        return {"status": int(arg)}
    if kind == "SLOW":
        return {"text": "SLOW-DONE", "slow": float(arg)}
    if kind == "WAIT":
        return {"text": "WAIT-DONE", "wait": float(arg)}
    return {"text": arg}


def content_blocks(plan: dict[str, Any]) -> list[dict[str, Any]]:
    """The content blocks of a planned reply."""
    if "tool" in plan:
        return [{"type": "tool_use", "id": "toolu_" + uuid.uuid4().hex[:20],
                 "name": plan.get("name", "Bash"), "input": plan["tool"]}]
    return [{"type": "text", "text": plan["text"]}]


class ModelServer:
    """Runs the scripted API on a host and port, in a background thread."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.seen: list[tuple[str, str]] = []  # (method, target) of every request, in arrival order
        self.heard: list[dict[str, str]] = []  # every request's headers (names lowercased, repeats joined), same order
        self.answers: list[dict[str, Any]] = []  # {"model", "usage"} of each message answered, in order
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer((host, port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "ModelServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def record(self, body: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(body)

    def saw(self, method: str, target: str, headers: dict[str, str]) -> None:
        with self._lock:
            self.seen.append((method, target))
            self.heard.append(headers)

    def targets(self) -> list[tuple[str, str]]:
        with self._lock:
            return list(self.seen)

    def answered(self, model: str, usage: dict[str, Any]) -> None:
        with self._lock:
            self.answers.append({"model": model, "usage": dict(usage)})

    def tool_requests(self) -> list[dict[str, Any]]:
        """The agent's own requests (the ones that offer tools), in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.get("tools")]

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def parse_request(self) -> bool:
                parsed = super().parse_request()
                if parsed:
                    names = {k.lower() for k in self.headers.keys()}
                    server.saw(self.command, self.path, {k: ", ".join(self.headers.get_all(k)) for k in names})
                return parsed

            def do_GET(self) -> None:  # the Messages API has no GET: recorded (above), then not found
                self._json(404, _error("not_found_error", self.path))

            do_PUT = do_PATCH = do_DELETE = do_OPTIONS = do_GET

            def do_HEAD(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                except ValueError:
                    return self._json(400, _error("invalid_request_error", "body is not JSON"))
                path = self.path.split("?")[0]
                if path.endswith("/count_tokens"):
                    return self._json(200, {"input_tokens": 10})
                if not path.endswith("/v1/messages"):
                    return self._json(404, _error("not_found_error", path))
                server.record(body)
                plan = plan_reply(body)
                if "status" in plan:
                    kind = "api_error" if plan["status"] >= 500 else "invalid_request_error"
                    # x-should-retry: false, as the real API sends for errors not worth retrying;
                    # without it Claude Code retries a 5xx for over a minute.
                    return self._json(plan["status"], _error(kind, "scripted failure"),
                                      {"x-should-retry": "false"})
                time.sleep(plan.get("wait", 0.0))
                message = _message(body, content_blocks(plan))
                server.answered(message["model"], message["usage"])
                if body.get("stream"):
                    return self._stream(message, plan.get("slow", 0.0))
                return self._json(200, message)

            def _json(self, status: int, payload: dict[str, Any], headers: dict | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("request-id", "req_" + uuid.uuid4().hex[:12])
                self.end_headers()
                self.wfile.write(data)

            def _stream(self, message: dict[str, Any], slow: float) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Cache-Control", "no-cache")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True
                for name, payload in _stream_events(message, slow):
                    if payload.get("_sleep"):
                        time.sleep(payload["_sleep"])
                        continue
                    frame = f"event: {name}\ndata: {json.dumps(payload)}\n\n"
                    self.wfile.write(frame.encode())
                    self.wfile.flush()

        return Handler


def _error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _message(body: dict[str, Any], blocks: list[dict[str, Any]]) -> dict[str, Any]:
    stop = "tool_use" if blocks[0]["type"] == "tool_use" else "end_turn"
    return {
        "id": "msg_" + uuid.uuid4().hex[:20], "type": "message", "role": "assistant",
        "model": body.get("model", "scripted"), "content": blocks,
        "stop_reason": stop, "stop_sequence": None, "usage": _usage(body, blocks),
    }


def _usage(body: dict[str, Any], blocks: list[dict[str, Any]]) -> dict[str, int]:
    """Token counts for a request and its reply, about one per four characters: a conversation under way reads
    half its prompt from the cache and writes a quarter, a first request writes a quarter."""
    prompt = max(4, len(json.dumps([body.get("system"), body.get("messages"), body.get("tools")])) // 4)
    read = prompt // 2 if len(body.get("messages") or []) > 1 else 0
    written = prompt // 4
    return {"input_tokens": prompt - read - written, "cache_creation_input_tokens": written,
            "cache_read_input_tokens": read, "output_tokens": max(1, len(json.dumps(blocks)) // 4)}


def _stream_events(message: dict[str, Any], slow: float):
    """The SSE events of a streamed message, the way the Messages API sends them."""
    usage = message["usage"]
    start = dict(message, content=[], stop_reason=None, usage=dict(usage, output_tokens=1))
    yield "message_start", {"type": "message_start", "message": start}
    for index, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": dict(block, input={})}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        else:
            yield "content_block_start", {"type": "content_block_start", "index": index,
                                          "content_block": {"type": "text", "text": ""}}
            words = block["text"].split(" ")
            pieces = [w + " " for w in words[:-1]] + [words[-1]]
            for piece in ([f"tick{i} " for i in range(int(slow * 4))] if slow else []) + pieces:
                if slow:
                    yield "", {"_sleep": 0.25}
                yield "content_block_delta", {"type": "content_block_delta", "index": index,
                                              "delta": {"type": "text_delta", "text": piece}}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {"type": "message_delta",
                            "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                            "usage": {"output_tokens": usage["output_tokens"]}}
    yield "message_stop", {"type": "message_stop"}


if __name__ == "__main__":  # a handy way to try Claude Code by hand
    import sys

    srv = ModelServer(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1",
                      int(sys.argv[2]) if len(sys.argv) > 2 else 8089).start()
    print(f"scripted model server on {srv.url}", flush=True)
    threading.Event().wait()
