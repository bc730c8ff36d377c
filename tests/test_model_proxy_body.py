"""The model proxy reads each request's body and betas (real proxy, real Postgres, a stand-in upstream that records
what reaches it): what would make the upstream connect out, run code or read the account's files is refused with a
403 naming the field and never forwarded; Claude Code's own requests go on byte for byte. A turn's credential works
only while its own turn runs, a hot process's while that process runs a turn of its session."""
from __future__ import annotations

import gzip
import http.client
import json
import logging
import uuid

import pytest

from core.db import transaction
from core.models import Session, Turn
from tests.test_model_proxy import CHUNKS, db, new_session, post, proxy, upstream  # noqa: F401 (fixtures)
from workers.model_proxy import mint_model_credential, read_model_claims

# The betas Claude Code 2.1.330 sends (measured through the scripted model, tests/model_server.py's `heard`).
CLAUDE_CODE_BETAS = ("claude-code-20250219,interleaved-thinking-2025-05-14,context-management-2025-06-27,"
                     "per-turn-control-2026-07-01,mid-conversation-tool-changes-2026-07-01,"
                     "thinking-token-count-2026-05-13,advanced-tool-use-2025-11-20,effort-2025-11-24,"
                     "thinking-display-updates-2026-08-18")
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="


def tool(name: str, **extra) -> dict:
    return {"name": name, "description": f"the {name} tool", "input_schema": {"type": "object", "properties": {}},
            **extra}


def claude_code_body(**changes) -> dict:
    """A request in the shape Claude Code 2.1.330 sends (its top-level fields and tool and block kinds, as measured),
    with what its tools can put in a conversation: a tool call whose input looks like a file source, an image and
    documents read from the workspace."""
    body = {
        "model": "claude-opus-4-5", "max_tokens": 128000, "stream": True,
        "metadata": {"user_id": "{\"session_id\": \"s\"}"}, "thinking": {"type": "adaptive", "display": "updates"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "medium"},
        "system": [{"type": "text", "text": "You are Claude Code."},
                   {"type": "text", "text": "env", "cache_control": {"type": "ephemeral"}}],
        "tools": [tool("Bash"), tool("Read"), tool("mcp__ccd__spawn_child"), tool("Custom", type="custom"),
                  tool("DeferredToolPlaceholder", defer_loading=True),
                  {"type": "web_search_20250305", "name": "web_search", "max_uses": 8}],
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "read it", "cache_control": {"type": "ephemeral"}}]},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "mcp__ccd__spawn_child",
                 "input": {"file_id": "file_1", "source": {"type": "url", "url": "http://x"}}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False, "content": [
                    {"type": "text", "text": "done"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}]},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "notes"}},
                {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}},
                {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "x"}]}},
                {"type": "text", "text": "SAY: fine"}]}]}
    body.update(changes)
    return body


def with_block(block: dict, inside_tool_result: bool = False) -> dict:
    """Claude Code's request with one more content block in its last user message (or in its tool result)."""
    body = claude_code_body()
    content = body["messages"][-1]["content"]
    (content[0]["content"] if inside_tool_result else content).append(block)
    return body


def running_credential(db, settings) -> tuple[str, dict[str, str]]:
    sid = new_session(db)
    return sid, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60)}


def answer(resp) -> dict:
    data = resp.read()
    return json.loads(data) if resp.getheader("content-type") == "application/json" else {"raw": data}


def test_claude_codes_own_requests_and_betas_reach_the_model_byte_for_byte(db, proxy, upstream, settings):
    upstream.release.set()
    _, headers = running_credential(db, settings)
    before = len(upstream.seen)
    sent = []
    for path in ("/v1/messages?beta=true", "/v1/messages/count_tokens?beta=true"):
        raw = json.dumps(claude_code_body(), indent=1).encode() + b"\n"  # any layout: the bytes go on as sent
        conn, resp = post(proxy.url, {**headers, "anthropic-beta": CLAUDE_CODE_BETAS}, raw, path)
        assert resp.status == 200 and resp.read() == b"".join(CHUNKS), path
        conn.close()
        sent.append(raw)
    reached = upstream.seen[before:]
    assert [seen["body"] for seen in reached] == sent
    assert all({k.lower(): v for k, v in seen["headers"].items()}["anthropic-beta"] == CLAUDE_CODE_BETAS
               for seen in reached)


REFUSED_BODIES = {
    "mcp_servers": (claude_code_body(mcp_servers=[{"type": "url", "url": "https://exfil.example/mcp",
                                                   "name": "x"}]), "`mcp_servers`"),
    "an empty mcp_servers": (claude_code_body(mcp_servers=[]), "`mcp_servers`"),
    "mcp_servers in other case": (claude_code_body(MCP_Servers=[{"url": "https://exfil.example"}]), "`MCP_Servers`"),
    "container": (claude_code_body(container="container_011"), "`container`"),
    "container skills": (claude_code_body(container={"skills": [{"type": "anthropic", "skill_id": "pptx"}]}),
                         "`container`"),
    "web_fetch": (claude_code_body(tools=[tool("Bash"), {"type": "web_fetch_20250910", "name": "web_fetch"}]),
                  "`tools[1].type` 'web_fetch_20250910'"),
    "code execution": (claude_code_body(tools=[{"type": "code_execution_20250825", "name": "code_execution"}]),
                       "`tools[0].type` 'code_execution_20250825'"),
    "an older code execution": (claude_code_body(tools=[{"type": "code_execution_20250522", "name": "c"}]),
                                "`tools[0].type` 'code_execution_20250522'"),
    "an MCP toolset": (claude_code_body(tools=[{"type": "mcp_toolset", "mcp_server_name": "x"}]),
                       "`tools[0].type` 'mcp_toolset'"),
    "a server tool search": (claude_code_body(tools=[{"type": "tool_search_tool_regex_20251119", "name": "t"}]),
                             "`tools[0].type` 'tool_search_tool_regex_20251119'"),
    "a bash tool of the API's": (claude_code_body(tools=[{"type": "bash_20250124", "name": "bash"}]),
                                 "`tools[0].type` 'bash_20250124'"),
    "a tool type that is no string": (claude_code_body(tools=[{"type": ["custom"], "name": "x"}]),
                                      "`tools[0].type` ['custom']"),
    "a file document": (with_block({"type": "document", "source": {"type": "file", "file_id": "file_011"}}),
                        "`messages[2].content[5].source.type` 'file'"),
    "a file image": (with_block({"type": "image", "source": {"type": "file", "file_id": "file_011"}}),
                     "`messages[2].content[5].source.type` 'file'"),
    "a file image in a tool result": (with_block({"type": "image", "source": {"type": "file", "file_id": "f"}},
                                                 inside_tool_result=True),
                                      "`messages[2].content[0].content[2].source.type` 'file'"),
    "a file inside a content document": (with_block({"type": "document", "source": {"type": "content", "content": [
        {"type": "image", "source": {"type": "file", "file_id": "file_011"}}]}}),
        "`messages[2].content[5].source.content[0].source.type` 'file'"),
    "a URL image": (with_block({"type": "image", "source": {"type": "url", "url": "https://exfil.example/?d=x"}}),
                    "`messages[2].content[5].source.type` 'url'"),
    "a URL document": (with_block({"type": "document", "source": {"type": "url", "url": "https://exfil.example"}}),
                       "`messages[2].content[5].source.type` 'url'"),
    "a container upload": (with_block({"type": "container_upload", "file_id": "file_011"}),
                           "`messages[2].content[5].file_id`"),
    "a file in the system prompt": (claude_code_body(system=[{"type": "document", "source": {"type": "file",
                                                                                           "file_id": "f"}}]),
                                    "`system[0].source.type` 'file'"),
}


@pytest.mark.parametrize("case", list(REFUSED_BODIES))
def test_a_body_that_makes_the_upstream_act_is_refused_naming_the_field_and_never_forwarded(
        case, db, proxy, upstream, settings, caplog):
    body, field = REFUSED_BODIES[case]
    sid, headers = running_credential(db, settings)
    before = len(upstream.seen)
    with caplog.at_level(logging.WARNING, logger="workers.model_proxy"):
        for path in ("/v1/messages?beta=true", "/v1/messages/count_tokens"):
            conn, resp = post(proxy.url, headers, json.dumps(body).encode(), path)
            refused = answer(resp)
            conn.close()
            assert resp.status == 403 and refused["error"]["type"] == "permission_error", (path, refused)
            assert refused["error"]["message"].startswith(field), refused
            assert resp.getheader("x-should-retry") == "false"
    assert len(upstream.seen) == before
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused POST")]
    assert len(lines) == 2 and all(f"for session {sid}" in line and field in line for line in lines), lines


@pytest.mark.parametrize("betas", [["files-api-2025-04-14"], [CLAUDE_CODE_BETAS + ",mcp-client-2025-04-04"],
                                   [CLAUDE_CODE_BETAS, "code-execution-2025-08-25"],
                                   ["claude-code-20250219, Web-Fetch-2025-09-10"], ["mcp-client-2025-11-20"]])
def test_a_beta_that_unlocks_those_features_is_refused_and_never_forwarded(betas, db, proxy, upstream, settings,
                                                                           caplog):
    sid, headers = running_credential(db, settings)
    before = len(upstream.seen)
    host, port = proxy.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/messages?beta=true", skip_accept_encoding=True)
    raw = json.dumps(claude_code_body()).encode()
    for name, value in [*headers.items(), ("content-type", "application/json"), ("content-length", str(len(raw))),
                        *(("anthropic-beta", beta) for beta in betas)]:
        conn.putheader(name, value)
    conn.endheaders(raw)
    resp = conn.getresponse()
    refused = answer(resp)
    conn.close()
    assert resp.status == 403 and refused["error"]["type"] == "permission_error", refused
    assert refused["error"]["message"].startswith("anthropic-beta '"), refused
    forbidden = betas[-1].rsplit(",", 1)[-1].strip()
    assert f"{forbidden!r}" in refused["error"]["message"]
    assert len(upstream.seen) == before


@pytest.mark.parametrize("raw, status, message", [
    (b'{"tools": [{"type": "web_fetch_20250910", "name": "f"}], "tools": [], "messages": []}', 400,
     "names the key 'tools' twice"),
    (b'{"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "file", "type": "base64", '
     b'"file_id": "f"}}]}]}', 400, "names the key 'type' twice"),
    (b'not json', 400, "is not a JSON object"),
    (b'[{"mcp_servers": []}]', 400, "is not a JSON object"),
    (b'', 400, "is not a JSON object")])
def test_a_body_the_proxy_cannot_read_one_way_is_refused(raw, status, message, db, proxy, upstream, settings):
    """Two parsers may read a repeated key differently (the first or the last): neither reading is forwarded."""
    _, headers = running_credential(db, settings)
    before = len(upstream.seen)
    conn, resp = post(proxy.url, headers, raw)
    refused = answer(resp)
    conn.close()
    assert (resp.status, refused["error"]["type"]) == (status, "invalid_request_error"), refused
    assert message in refused["error"]["message"]
    assert len(upstream.seen) == before


def test_an_encoded_body_is_refused_it_could_hide_any_field(db, proxy, upstream, settings):
    _, headers = running_credential(db, settings)
    before = len(upstream.seen)
    raw = gzip.compress(json.dumps(claude_code_body(mcp_servers=[{"url": "https://exfil.example"}])).encode())
    conn, resp = post(proxy.url, {**headers, "content-encoding": "gzip"}, raw)
    refused = answer(resp)
    conn.close()
    assert (resp.status, refused["error"]["type"]) == (415, "invalid_request_error"), refused
    assert len(upstream.seen) == before


def test_a_credential_reaches_the_model_only_while_its_own_turn_runs(db, proxy, upstream, settings):
    upstream.release.set()
    sid = new_session(db, turns=("succeeded", "running"))
    with transaction(db) as s:
        first, second = s.scalars(Turn.__table__.select().where(Turn.session_id == uuid.UUID(sid))
                                  .order_by(Turn.seq)).all()
    before = len(upstream.seen)
    body = json.dumps(claude_code_body()).encode()
    old = {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60, str(first))}
    conn, resp = post(proxy.url, old, body)
    refused = answer(resp)
    conn.close()
    assert (resp.status, refused["error"]["type"]) == (403, "permission_error"), refused
    assert refused["error"]["message"] == (f"turn {first} of session {sid} is not running; its credential reaches "
                                           "the model only during that turn")
    # Another session's running turn is no better.
    other = new_session(db)
    with transaction(db) as s:
        theirs = s.scalar(Turn.__table__.select().with_only_columns(Turn.id).where(Turn.session_id == uuid.UUID(other)))
    conn, resp = post(proxy.url, {"x-api-key": mint_model_credential(settings.jwt_secret, sid, 60, str(theirs))},
                      body)
    assert resp.status == 403 and "is not running" in answer(resp)["error"]["message"]
    conn.close()
    assert len(upstream.seen) == before
    # The running turn's own credential, and one naming no turn (older workers mint those), get through.
    for credential in (mint_model_credential(settings.jwt_secret, sid, 60, str(second)),
                       mint_model_credential(settings.jwt_secret, sid, 60)):
        conn, resp = post(proxy.url, {"x-api-key": credential}, body)
        assert resp.status == 200 and resp.read() == b"".join(CHUNKS)
        conn.close()
    assert len(upstream.seen) == before + 2


def set_processes(db, sid: str, session_process: uuid.UUID | None, turn_processes: dict[int, uuid.UUID | None]
                  ) -> None:
    """The process the session last reported, and per turn seq the process its credential was minted for."""
    with transaction(db) as s:
        s.execute(Session.__table__.update().where(Session.id == uuid.UUID(sid)).values(process_id=session_process))
        for seq, process in turn_processes.items():
            s.execute(Turn.__table__.update().where(Turn.session_id == uuid.UUID(sid), Turn.seq == seq)
                      .values(process_id=process))


def two_processes(db, settings) -> tuple[str, uuid.UUID, uuid.UUID, dict[uuid.UUID, str]]:
    """A session whose turn 2 runs, two process ids and a model credential naming each."""
    sid = new_session(db, turns=("succeeded", "running"))
    processes = uuid.uuid4(), uuid.uuid4()
    return sid, *processes, {p: mint_model_credential(settings.jwt_secret, sid, 60, process_id=str(p))
                             for p in processes}


def ask(proxy, credential: str) -> tuple[int, dict]:
    """Claude Code's request with this credential: the status and the answer."""
    conn, resp = post(proxy.url, {"x-api-key": credential}, json.dumps(claude_code_body()).encode())
    answered = answer(resp)
    conn.close()
    return resp.status, answered


def refusal(proxy, credential: str) -> str:
    """The message of the 403 Claude Code's request with this credential gets."""
    status, refused = ask(proxy, credential)
    assert (status, refused["error"]["type"]) == (403, "permission_error"), refused
    return refused["error"]["message"]


def test_a_hot_process_credential_reaches_the_model_while_that_process_runs_a_turn_of_its_session(
        db, proxy, upstream, settings):
    upstream.release.set()
    sid, started, reported, key = two_processes(db, settings)
    before = len(upstream.seen)
    # The turn's own process_id: the worker minted the key for a process serve starts for this turn.
    set_processes(db, sid, None, {1: None, 2: started})
    assert ask(proxy, key[started]) == (200, {"raw": b"".join(CHUNKS)})
    assert "which has ended" in refusal(proxy, key[reported])
    # sessions.process_id: serve said the process runs this turn (a hot one, started for an earlier turn).
    set_processes(db, sid, reported, {2: uuid.uuid4()})
    assert ask(proxy, key[reported]) == (200, {"raw": b"".join(CHUNKS)})
    assert len(upstream.seen) == before + 2
    # An earlier turn's process_id is no better than none: only the running turn's counts.
    set_processes(db, sid, None, {1: started, 2: None})
    assert refusal(proxy, key[started]) == (f"the credential belongs to Claude Code process {started} of session "
                                           f"{sid}, which has ended; it reaches the model only while that process "
                                           "runs the session's turns")
    assert len(upstream.seen) == before + 2


def test_a_hot_process_credential_is_refused_between_turns_and_once_a_new_process_took_over(
        db, proxy, upstream, settings):
    upstream.release.set()
    sid, dead, alive, key = two_processes(db, settings)
    before = len(upstream.seen)
    # Turn 1 ran on `dead`; the process ended and serve started `alive` for turn 2: the dead process's key is refused.
    set_processes(db, sid, alive, {1: dead, 2: alive})
    assert refusal(proxy, key[dead]).startswith(f"the credential belongs to Claude Code process {dead} of session "
                                                f"{sid}, which has ended")
    assert ask(proxy, key[alive])[0] == 200
    # Between turns the process is still the session's, and still refused: no turn runs.
    with transaction(db) as s:
        s.execute(Turn.__table__.update().where(Turn.session_id == uuid.UUID(sid)).values(status="succeeded"))
    assert refusal(proxy, key[alive]) == (f"session {sid} has no turn running; its credential reaches the model "
                                          "only during a turn")
    assert len(upstream.seen) == before + 1


def test_a_model_credential_names_its_turn_or_its_process_and_reads_back_what_it_names(settings):
    sid, tid, pid = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    read = lambda credential: read_model_claims(settings.jwt_secret, credential)  # noqa: E731
    assert read(mint_model_credential(settings.jwt_secret, str(sid), 60)) == (sid, None, None)
    assert read(mint_model_credential(settings.jwt_secret, str(sid), 60, str(tid))) == (sid, tid, None)
    assert read(mint_model_credential(settings.jwt_secret, str(sid), 60, process_id=str(pid))) == (sid, None, pid)
    with pytest.raises(ValueError, match="not both"):
        mint_model_credential(settings.jwt_secret, str(sid), 60, str(tid), str(pid))
