"""The ccd MCP server as Claude Code meets it: `python -m wrapper mcp` speaking JSON-RPC on stdio."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A loopback port nothing listens on (it was free a moment ago)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class McpProcess:
    """A running server and a line-at-a-time JSON-RPC conversation with it."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "wrapper", "mcp"], cwd=ROOT, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._next_id = 0

    def send(self, message: dict | str) -> None:
        line = message if isinstance(message, str) else json.dumps(message)
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def receive(self, timeout: float = 2.0) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert ready, "the server did not answer in time"
        line = self.proc.stdout.readline()
        assert line, "the server closed stdout: " + self.proc.stderr.read().decode()
        return json.loads(line)

    def request(self, method: str, params: dict | None = None) -> dict:
        self._next_id += 1
        message = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        answer = self.receive()
        assert answer["id"] == self._next_id, answer
        return answer

    def call(self, name: str, arguments: dict) -> dict:
        return self.request("tools/call", {"name": name, "arguments": arguments})["result"]

    def close(self) -> int:
        self.proc.stdin.close()
        try:
            return self.proc.wait(5)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.stdout.close()
            self.proc.stderr.close()


@pytest.fixture
def server():
    """An initialized server whose CCD_API_URL points at a port where nothing listens."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), CCD_API_URL=f"http://127.0.0.1:{free_port()}",
               CCD_SESSION_TOKEN="token", CCD_SESSION_ID="11111111-1111-1111-1111-111111111111")
    mcp = McpProcess(env)
    answer = mcp.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {},
                                        "clientInfo": {"name": "test", "version": "0"}})
    assert answer["result"]["protocolVersion"] == "2025-06-18"
    mcp.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    yield mcp
    assert mcp.close() == 0


def test_initialize_names_the_server_and_offers_tools(server):
    answer = server.request("initialize", {"protocolVersion": "2024-11-05", "capabilities": {}})
    result = answer["result"]
    assert result["serverInfo"]["name"] == "ccd" and result["capabilities"] == {"tools": {}}
    assert result["protocolVersion"] == "2024-11-05"


def test_initialize_with_an_unknown_version_answers_the_latest(server):
    answer = server.request("initialize", {"protocolVersion": "1999-01-01", "capabilities": {}})
    assert answer["result"]["protocolVersion"] == "2025-06-18"


def test_tools_list_has_the_four_tools_with_object_schemas(server):
    tools = server.request("tools/list")["result"]["tools"]
    assert {t["name"] for t in tools} == {"spawn_child", "send_message", "wait_for_child", "list_children"}
    for tool in tools:
        assert tool["inputSchema"]["type"] == "object" and isinstance(tool["inputSchema"]["properties"], dict)
        assert tool["description"]


def test_a_call_when_the_api_is_unreachable_is_a_tool_error(server):
    started = time.monotonic()
    result = server.call("list_children", {})
    assert result["isError"] is True
    text = result["content"][0]["text"]
    assert "cannot reach the cc-docker API at http://127.0.0.1:" in text and "refused" in text.lower()
    assert time.monotonic() - started < 2


def test_the_server_keeps_serving_after_a_failed_call(server):
    assert server.call("spawn_child", {"prompt": "hi"})["isError"] is True
    assert server.request("ping")["result"] == {}


@pytest.mark.parametrize("name, arguments, expected", [
    ("wait_for_child", {}, "missing required argument 'session_id'"),
    ("wait_for_child", {"session_id": "s", "timeout_seconds": 0}, "'timeout_seconds' must be between 1 and 3600"),
    ("spawn_child", {"wait_seconds": "soon"}, "'wait_seconds' must be an integer"),
    ("spawn_child", {"config": "fast"}, "'config' must be a JSON object"),
    ("send_message", {"session_id": 7, "prompt": "hi"}, "'session_id' must be a string"),
    ("list_children", {"everything": True}, "unknown argument 'everything'"),
])
def test_bad_arguments_are_a_tool_error_naming_the_argument(server, name, arguments, expected):
    result = server.call(name, arguments)
    assert result["isError"] is True
    assert expected in result["content"][0]["text"]


def test_an_unknown_method_is_method_not_found(server):
    assert server.request("resources/list")["error"]["code"] == -32601


def test_a_garbage_line_is_a_parse_error_with_a_null_id(server):
    server.send("this is not json {")
    answer = server.receive()
    assert answer["id"] is None and answer["error"]["code"] == -32700


def test_a_notification_gets_no_reply(server):
    server.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 99}})
    server.send({"jsonrpc": "2.0", "method": "no/such/notification"})
    # Messages are answered in order: had either notification been answered, that reply would come first.
    assert server.request("ping") == {"jsonrpc": "2.0", "id": 1 + 0 + server._next_id - 1, "result": {}}
