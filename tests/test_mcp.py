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
    # Messages are answered in order: had either notification been answered, that reply would come
    # first, and request() would find the wrong id.
    assert server.request("ping")["result"] == {}


FAKE_CLAUDE = """#!/usr/bin/env python3
import json, pathlib, sys
path = sys.argv[sys.argv.index("--mcp-config") + 1] if "--mcp-config" in sys.argv else None
config = json.loads(pathlib.Path(path).read_text()) if path else None
mode = oct(pathlib.Path(path).stat().st_mode & 0o777) if path else None
print(json.dumps({"argv": sys.argv[1:], "config": config, "mode": mode}))
"""


def run_wrapper(tmp_path: Path, extra_env: dict[str, str], *flags: str) -> dict:
    """Runs `wrapper run` with a stand-in for Claude Code that reports its argv and MCP config."""
    fake = tmp_path / "claude"
    fake.write_text(FAKE_CLAUDE)
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCD_")}
    env.update(extra_env, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "wrapper", "run", "--turn-id", "t1", "--session-id", "c1",
                           "--log-dir", str(tmp_path / "turns"), "--claude", str(fake), *flags],
                          cwd=ROOT, env=env, input=b"hi", capture_output=True, timeout=10)
    assert done.returncode == 0, done.stderr
    first = done.stdout.decode().splitlines()[0]
    return json.loads(first.split("\t", 1)[1])


def test_wrapper_run_gives_claude_the_ccd_server_and_deletes_its_config_after(tmp_path):
    env = {"CCD_API_URL": "http://api", "CCD_SESSION_TOKEN": "secret", "CCD_SESSION_ID": "s1"}
    seen = run_wrapper(tmp_path, env, "--allowed-tools", "Bash,Read")
    server = seen["config"]["mcpServers"]["ccd"]
    assert server["args"] == ["-S", "-P", "-m", "wrapper", "mcp"] and server["type"] == "stdio"
    assert server["alwaysLoad"] is True  # else Claude Code hides the tools behind ToolSearch
    assert server["env"] == {**env, "PYTHONPATH": str(ROOT)}
    assert seen["mode"] == "0o600"
    argv = seen["argv"]
    assert argv[argv.index("--allowedTools") + 1] == "Bash,Read,mcp__ccd"
    assert not (tmp_path / "turns" / "t1.mcp.json").exists()


def test_wrapper_run_approves_the_ccd_tools_even_without_an_allowed_tools_list(tmp_path):
    env = {"CCD_API_URL": "http://api", "CCD_SESSION_TOKEN": "secret", "CCD_SESSION_ID": "s1"}
    argv = run_wrapper(tmp_path, env)["argv"]
    assert argv[argv.index("--allowedTools") + 1] == "mcp__ccd"


def test_wrapper_run_without_the_api_env_adds_no_mcp_server(tmp_path):
    seen = run_wrapper(tmp_path, {}, "--allowed-tools", "Bash")
    assert "--mcp-config" not in seen["argv"] and seen["config"] is None
    assert seen["argv"][seen["argv"].index("--allowedTools") + 1] == "Bash"


def test_an_api_refusal_reads_as_message_code_and_status():
    from wrapper.spawn_tools import refusal

    body = json.dumps({"error": {"code": "spawn_depth_exceeded", "message": "too deep"}}).encode()
    assert refusal(409, body) == "cc-docker refused: too deep (spawn_depth_exceeded, HTTP 409)"
    assert refusal(502, b"<html>bad gateway</html>") == "cc-docker refused with HTTP 502: <html>bad gateway</html>"


class TurnsThatStayRunning:
    """Stands in for wrapper.spawn_tools.Api in-process (no HTTP): every turn read answers `running`."""

    def __init__(self) -> None:
        self.paths: list[str] = []

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        self.paths.append(path)
        time.sleep(0.2)
        return {"id": "t-1", "status": "running"}


def test_a_wait_that_runs_out_reports_progress_and_says_it_can_be_resumed():
    from wrapper.spawn_tools import ToolError, wait_for_turn

    api, notes = TurnsThatStayRunning(), []
    with pytest.raises(ToolError) as refused:
        wait_for_turn(api, "s-1", {"id": "t-1", "status": "queued"}, 1, notes.append)
    assert api.paths[0] == "/api/v1/turns/t-1?wait=1" and len(api.paths) >= 2
    assert len(notes) == len(api.paths) - 1 and "is running" in notes[0]
    assert "still running after 1 s" in str(refused.value) and "turn_id t-1" in str(refused.value)
