"""The model proxy against requests made from inside real session containers with the turn's own credential: bodies
that would make the upstream connect out or read the account's files are refused while Claude Code's own requests
keep working, and a credential kept from an earlier turn is dead in the next; the scripted model records what
reached it."""
from __future__ import annotations

import json
import textwrap

import pytest

from tests.test_e2e import container_of
from tests.test_hardening_e2e import sh
from tests.test_model_proxy_body import CLAUDE_CODE_BETAS
from tests.test_model_proxy_e2e import api, bash_result, started_session  # noqa: F401 (the api fixture)

pytestmark = pytest.mark.docker

# Run by the agent's own Bash tool, with the credential and the proxy's address from its environment.
#   probe.py attack       a Messages call with mcp_servers, one with a file document, one plain
#   probe.py old PATH     a plain call with the credential kept in PATH, then one with this turn's
PROBE = textwrap.dedent("""
    import http.client, json, os, sys
    from urllib.parse import urlsplit

    base, own = urlsplit(os.environ["ANTHROPIC_BASE_URL"]), os.environ["ANTHROPIC_API_KEY"]

    def call(key, text, extra=(), blocks=()):
        content = [*blocks, {"type": "text", "text": f"SAY: {text}"}]
        body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": content}], **dict(extra)}
        conn = http.client.HTTPConnection(base.hostname, base.port, timeout=30)
        conn.request("POST", "/v1/messages?beta=true", body=json.dumps(body).encode(),
                     headers={"x-api-key": key, "anthropic-version": "2023-06-01", "content-type": "application/json"})
        resp = conn.getresponse()
        answer = json.loads(resp.read() or b"{}")
        conn.close()
        error = answer.get("error") or {}
        return [resp.status, error.get("type") or answer.get("type"), error.get("message", "")]

    mode = sys.argv[1]
    if mode == "attack":
        out = {"mcp": call(own, "mcp-probe", {"mcp_servers": [{"type": "url", "url": "http://exfil.example/mcp",
                                                                "name": "exfil"}]}),
               "file": call(own, "file-probe", blocks=[{"type": "document",
                                                        "source": {"type": "file", "file_id": "file_011"}}]),
               "plain": call(own, "plain-probe")}
    else:
        with open(sys.argv[2]) as f:
            old = f.read().strip()
        out = {"same": old == own, "old": call(old, "old-probe"), "own": call(own, "own-probe")}
    print(json.dumps(out))
""")


def texts(body: dict) -> str:
    return json.dumps(body.get("messages"))


def test_from_inside_a_turn_mcp_servers_and_file_sources_are_refused_and_claude_codes_requests_keep_working(
        api, stack_env, docker_client, settings):
    model = stack_env["model"]
    sid = started_session(api)
    sh(container_of(docker_client, settings, sid), "true", stdin_file=("/tmp/body_probe.py", PROBE))
    before, heard_before = len(model.requests), len(model.heard)
    seen = bash_result(api, sid, "python3 /tmp/body_probe.py attack")
    assert seen["mcp"][:2] == [403, "permission_error"] and "`mcp_servers`" in seen["mcp"][2], seen
    assert seen["file"][:2] == [403, "permission_error"] and "source.type` 'file'" in seen["file"][2], seen
    # The same credential, in the same turn, reaches the model with a plain call ...
    assert seen["plain"][:2] == [200, "message"], seen
    reached = model.requests[before:]
    assert any("plain-probe" in texts(body) for body in reached)
    # ... and so did the turn's Claude Code, before and after its Bash tool ran (bash_result read the model's answer
    # to the tool's output), with its own betas.
    own = [body for body in reached if body.get("tools")]
    assert len(own) >= 2 and any("tool_result" in texts(body) for body in own), len(own)
    betas = {headers.get("anthropic-beta") for headers in model.heard[heard_before:]} - {None}
    assert betas == {CLAUDE_CODE_BETAS}, betas  # what the unit tests send as Claude Code's is what it sends
    # The forbidden bodies never reached the model.
    assert not [body for body in reached if "mcp_servers" in body or "file_id" in texts(body)
                or "mcp-probe" in texts(body) or "file-probe" in texts(body)]
    log = stack_env["proxy"].log_path.read_text(errors="replace")
    refused = [line for line in log.splitlines() if f"for session {sid}" in line and "refused POST" in line]
    assert any("`mcp_servers`" in line for line in refused) and any("'file'" in line for line in refused), refused


def test_a_credential_kept_from_turn_1_is_refused_once_its_claude_code_process_has_ended(
        api, stack_env, docker_client, settings):
    model = stack_env["model"]
    sid = api.session()["id"]
    # Turn 1 keeps its credential where a process it leaves behind (or the agent's next command) finds it.
    first = api.chat(sid, "RUN: printenv ANTHROPIC_API_KEY > /tmp/turn1.key && echo kept")["id"]
    turn = api.finished_turn(first)
    assert (turn["status"], turn["result"].strip()) == ("succeeded", "BASH-RESULT: kept"), turn
    box = container_of(docker_client, settings, sid)
    sh(box, "true", stdin_file=("/tmp/body_probe.py", PROBE))
    # The hot process holds that key for its whole life; once it has ended, the next turn's process has its own.
    sh(box, "pkill -KILL -f '^claude -p --input-format' || true")
    before = len(model.requests)
    seen = bash_result(api, sid, "python3 /tmp/body_probe.py old /tmp/turn1.key")  # turn 2, in a new process
    assert seen["same"] is False, seen
    assert seen["old"][:2] == [403, "permission_error"] and "has ended" in seen["old"][2], seen
    assert seen["own"][:2] == [200, "message"], seen
    reached = [texts(body) for body in model.requests[before:]]
    assert any("own-probe" in text for text in reached) and not any("old-probe" in text for text in reached)
