"""What a Messages API call may ask of the account behind the model proxy: no request makes the model's API itself
connect out (MCP servers, web fetch, URL sources), run code, or read the account's uploaded files."""
from __future__ import annotations

import json
from email.message import Message
from typing import Any, Iterator

# Top-level fields that make the upstream act for the request: connect to MCP servers of its choosing, or run a
# code execution container (skills live in it too).
FORBIDDEN_FIELDS = ("mcp_servers", "container")
# Claude Code's own tools are client tools (no type, or "custom"); the one server tool it may use is web search.
# Every other typed tool is refused, whatever comes next: web_fetch_*, code_execution_*, mcp_toolset, tool search.
CLIENT_TOOL_TYPES = (None, "custom")
SERVER_TOOL_PREFIXES = ("web_search_",)
# Image and document sources carried in the request itself; "file" reads the account's files, "url" makes the
# upstream fetch an address of the request's choosing.
INLINE_SOURCES = ("base64", "text", "content")
FORBIDDEN_BETAS = ("files-api-", "mcp-client-", "code-execution-", "web-fetch-")
UNENCODED = ("", "identity")

Problem = tuple[int, str, str]  # status, Anthropic error type, message


class DuplicateKey(ValueError):
    """A JSON object names one key twice: parsers disagree on which one counts, so the proxy reads neither."""


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise DuplicateKey(key)
        found[key] = value
    return found


def refused_call(headers: Message, body: bytes) -> Problem | None:
    """Why the proxy must not forward this request (status, error type, message), or None when it may."""
    for header in headers.get_all("anthropic-beta") or []:
        for beta in header.split(","):
            if beta.strip().lower().startswith(FORBIDDEN_BETAS):
                return 403, "permission_error", (f"anthropic-beta {beta.strip()!r} unlocks what the model proxy "
                                                 "forwards no request for (the account's files, MCP servers, code "
                                                 "execution, web fetch)")
    if headers.get("content-encoding", "").strip().lower() not in UNENCODED:
        return 415, "invalid_request_error", "the model proxy forwards request bodies without Content-Encoding only"
    try:
        request = json.loads(body, object_pairs_hook=_unique)
    except DuplicateKey as exc:
        return 400, "invalid_request_error", f"the request body names the key {str(exc)[:100]!r} twice in one object"
    except ValueError:
        request = None
    if not isinstance(request, dict):
        return 400, "invalid_request_error", "the request body is not a JSON object"
    message = _forbidden_field(request)
    return None if message is None else (403, "permission_error", message)


def _forbidden_field(request: dict[str, Any]) -> str | None:
    """A message naming the first field of the request that makes the upstream act for it, or None."""
    for key in request:
        if key.lower() in FORBIDDEN_FIELDS:
            return (f"`{key}` in the request body makes the model's API act for the request; the model proxy "
                    "forwards no request with it")
    tools = request.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind not in CLIENT_TOOL_TYPES and not (isinstance(kind, str) and kind.startswith(SERVER_TOOL_PREFIXES)):
            return (f"`tools[{i}].type` {kind!r} is a server tool the model's API would run itself; the model proxy "
                    "forwards client tools (no type, or custom) and web_search only")
    for name in ("system", "messages"):
        for block, path in _objects(request.get(name), name):
            if "file_id" in block:
                return (f"`{path}.file_id` reads the account's uploaded files; the model proxy forwards no request "
                        "with it")
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") not in INLINE_SOURCES:
                return (f"`{path}.source.type` {source.get('type')!r} is not carried in the request (the account's "
                        "files, or an address the model's API would fetch); the model proxy forwards base64, text "
                        "and content sources only")
    return None


def _objects(value: Any, path: str) -> Iterator[tuple[dict[str, Any], str]]:
    """Every object nested in `value` with its path, but for tool inputs: those are the model's own arguments."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            yield from _objects(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        yield value, path
        for key, item in value.items():
            if key != "input":
                yield from _objects(item, f"{path}.{key}")
