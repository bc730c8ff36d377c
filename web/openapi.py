"""The OpenAPI 3.1 document: paths from the app's URL map, bodies and queries from the pydantic
request models that validate them, and a table (OPERATIONS) of what each endpoint answers.

Every rule of the URL map must have an entry here: `undocumented(app)` lists those that do not,
and tests/test_openapi.py fails on any, so a new route cannot go undocumented.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from flask import Flask
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from core.envelope import SERVICE_TYPES
from core.idempotency import MAX_KEY_LENGTH
from core.resources import ApprovalOut, SessionOut, TurnOut
from web import schemas
from web.routes.tokens import RevokeRequest

REF = "#/components/schemas/{model}"
JSON = "application/json"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# Methods werkzeug adds to every rule by itself.
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}
ERROR_TEXT = {400: "Bad request: a validation error names the field (`field`, `details`)",
              401: "Missing, invalid, expired or revoked token",
              402: "The spawn tree's budget (`max_budget_usd`) is spent (`budget_exhausted`)",
              403: "A session token used outside its session's subtree, or setting a webhook (`token_scope`); "
                   "answering an approval (`forbidden`: only the owner's tokens may)",
              404: "No such resource of the caller's (another owner's id is a 404 too)",
              409: "The resource is in a state that does not allow this (`wrong_state` and more specific codes, "
                   "e.g. `approval_resolved`: the approval was answered, timed out or its turn ended)",
              413: "Too large: request body, prompt, batch, upload, unpacked archive or download (the limit is in "
                   "`limit` or the message)",
              415: "Unsupported Content-Type",
              422: "Well-formed but refused (`page_too_large`, `not_revocable`, `limit_exceeded`: a session asked for "
                   "more than a ceiling; `field` names it, `limit` is the ceiling; `invalid_answer`: an approval's "
                   "deny with updated_input or remember)",
              429: "Over a per-owner limit; retry after `retry_after` seconds (also the Retry-After header)",
              503: "Postgres, Redis or the session's host is not answering; try again shortly"}


# Response bodies that core/resources.py builds from its models (SessionOut, TurnOut) or by hand.
class Totals(BaseModel):
    input_tokens: int
    output_tokens: int
    cost_usd: float


class Event(BaseModel):
    """The event envelope: every frame of every endpoint (page, SSE, NDJSON, WebSocket) has this shape."""
    id: str | None = Field(description="Redis stream id (a tree cursor with ?tree=true); resume with since=<id>")
    session_id: str
    turn_id: str | None
    seq: int | None = Field(description="the line number within the turn, for claude.* events")
    type: str = Field(pattern="^(claude\\..+|" + "|".join(re.escape(t) for t in sorted(SERVICE_TYPES)) + ")$",
                      description="claude.<type> for a line of Claude Code's stream-json (data is that line), "
                                  "or one of " + ", ".join(sorted(SERVICE_TYPES)))
    ts: str
    data: dict[str, Any]


class EventsPage(BaseModel):
    items: list[Event]
    next_since: str | None
    has_more: bool


class BatchResource(BaseModel):
    id: str
    status: str
    concurrency: int
    total: int
    counts: dict[str, int]
    progress: float
    webhook: str | None
    webhook_status: str | None
    created_at: str
    finished_at: str | None
    links: dict[str, str]


class Revoked(BaseModel):
    jti: str | None
    exp: int | None
    revoked: bool


class FilesWritten(BaseModel):
    files: int
    bytes: int


class FileWritten(BaseModel):
    path: str
    bytes: int


class Health(BaseModel):
    status: str


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str = Field(description="stable, machine-readable")
    message: str
    field: str | None = None
    details: list[dict[str, Any]] | None = None
    limit: int | None = None
    retry_after: int | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


def session_schema(turn_ref: dict) -> dict:
    """SessionOut as session_body() shows it: token counts and cost under `totals`, links, the latest turn."""
    schema = SessionOut.model_json_schema(mode="serialization", ref_template=REF)
    for name in ("input_tokens", "output_tokens", "cost_usd"):
        schema["properties"].pop(name)
        schema["required"].remove(name)
    schema["properties"].update({
        "totals": {"$ref": REF.format(model="Totals")},
        "links": {"type": "object", "additionalProperties": {"type": "string"}},
        "latest_turn": {"anyOf": [turn_ref, {"type": "null"}], "description": "on GET and in children lists"},
        "turn": {"anyOf": [turn_ref, {"type": "null"}], "description": "spawn: the child's first turn"},
        "children": {"type": "array", "items": {"$ref": REF.format(model="Session")},
                     "description": "children?recursive=true: the sessions below this one"},
    })
    schema["required"] += ["totals", "links"]
    schema["title"] = "Session"
    return schema


def turn_schema() -> dict:
    """TurnOut as turn_body() shows it: costs as numbers, links."""
    schema = TurnOut.model_json_schema(mode="serialization", ref_template=REF)
    schema["properties"]["cost_usd"] = {"type": "number", "description": "metered at the model proxy from the "
                                        "model's answers (what budgets count); grows while the turn runs"}
    schema["properties"]["reported_cost_usd"] = {"anyOf": [{"type": "number"}, {"type": "null"}],
                                                 "description": "the cost Claude Code's result line reported, clamped "
                                                                "to the column's range; shown only, never counted"}
    schema["properties"]["links"] = {"type": "object", "additionalProperties": {"type": "string"}}
    schema.pop("$defs", None)  # ApprovalOut: a component of its own (Approval)
    schema["properties"]["pending_approvals"] = {
        "type": "array", "items": ref("Approval"),
        "description": "the turn's permission prompts waiting for an answer (session config approvals: ask)"}
    schema["required"] = sorted(set(schema["required"]) | {"links"})
    schema["title"] = "Turn"
    return schema


def approval_schema() -> dict:
    """ApprovalOut as approval_body() shows it."""
    schema = ApprovalOut.model_json_schema(mode="serialization", ref_template=REF)
    schema["properties"]["status"] = {"enum": ["pending", "allowed", "denied", "timed_out", "cancelled"],
                                      "description": "cancelled: the turn ended while it was pending"}
    schema["properties"]["decision"] = {
        "anyOf": [{"type": "object", "properties": {
            "behavior": {"enum": ["allow", "deny"]}, "updated_input": {"type": "object"},
            "message": {"type": "string"}, "remember": {"type": "boolean"},
            "via": {"enum": ["rest", "websocket", "timeout", "turn_ended"]}}}, {"type": "null"}],
        "description": "the answer: behavior, the edited input or message it gave, remember, and how it came"}
    schema["title"] = "Approval"
    return schema


def page_of(ref: str) -> dict:
    return {"type": "object", "required": ["items", "total", "limit", "offset", "next_offset"],
            "properties": {"items": {"type": "array", "items": {"$ref": REF.format(model=ref)}},
                           "total": {"type": "integer"}, "limit": {"type": "integer"},
                           "offset": {"type": "integer"}, "next_offset": {"type": ["integer", "null"]}}}


def ref(model: str) -> dict:
    return {"$ref": REF.format(model=model)}


STREAM_TEXT = {"type": "string", "description": "a stream of text frames; see the operation's description"}
BINARY = {"type": "string", "format": "binary"}

SSE_PROTOCOL = """
**Server-Sent Events** (send `Accept: text/event-stream`): the response starts with `retry: 2000`,
then one frame per event — `id: <event id>`, `event: <type>`, `data: <the envelope as JSON>` — and
`: keep-alive` comments on quiet seconds. It replays every event after the `Last-Event-ID` header
(or `since`), then follows live ones, until the session is deleted. A `since` older than what is
retained gets a `stream.gap` event first. Browsers' EventSource cannot send headers: pass the token
as `?token=`. If the event store stays away the stream ends; reconnect with `Last-Event-ID`."""

WS_PROTOCOL = """
**WebSocket** (connect with `ws://` / `wss://`; a plain GET is a 400 `websocket_required`). The token
goes in the Authorization header or, from a browser, as `?token=`; it is checked before the upgrade,
so a bad one is a plain 401 and another owner's session a 404.

Server → client, JSON text frames: every event envelope (see the `Event` schema) after `since`, exactly
once and in order, then live ones; plus one reply per client command:
`{"type": "reply", "id": <echoed>, "ok": true, "turn": {...}}` (`"approval": {...}` for approve) or
`{"type": "reply", "id": <echoed>, "ok": false, "error": {"code", "message"}}`.

Client → server, JSON text frames:
`{"type": "chat", "prompt": "...", "webhook": "<optional>", "id": "<optional, echoed>"}` queues a turn
(the same rules as POST .../chat); `{"type": "cancel", "turn_id": "...", "id": "<optional>"}` cancels one
of this session's turns (another session's is `wrong_session`, and nothing is done);
`{"type": "approve", "turn_id": "...", "request_id": "...", "behavior": "allow" | "deny", "updated_input": {...},
"message": "...", "remember": true, "id": "<optional>"}` answers a permission prompt as
POST /turns/{turn_id}/approvals/{request_id} does (any turn of the owner's, a child session's too; a session
token's answer is refused with `forbidden`).
A frame larger than CCD_MAX_BODY_BYTES closes the socket (1009).

Heartbeats are WebSocket pings every CCD_WS_PING_SECONDS. The socket closes with 1000 when the session
is deleted, and 1011 when the event store stays away: reconnect with `?since=<the last id received>`.
The token is checked again on every command and every 2 s: once it has expired or been revoked, or a
session token's session stopped, the socket closes with 4401 and the reason `<code>: <message>`."""


@dataclass(frozen=True)
class Response:
    description: str
    content: dict[str, dict] = field(default_factory=lambda: {JSON: {}})


def json_response(description: str, schema: dict) -> Response:
    return Response(description, {JSON: schema})


@dataclass(frozen=True)
class Op:
    """What one endpoint takes and answers; errors are added from `errors` and what the route shows."""
    summary: str
    responses: dict[int, Response]
    body: type[BaseModel] | None = None
    body_content: dict[str, dict] | None = None  # other (or more) request media types → schema
    body_required: bool = False
    query: type[BaseModel] | None = None
    headers: tuple[str, ...] = ()
    errors: tuple[int, ...] = ()
    public: bool = False
    description: str = ""
    tag: str = ""


HEADERS = {
    "Idempotency-Key": {"name": "Idempotency-Key", "in": "header", "required": False,
                        "description": "a retry with the same key and body answers with what the first request "
                                       "made (remembered CCD_IDEMPOTENCY_TTL_SECONDS); another body is a 409",
                        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_KEY_LENGTH}},
    "Last-Event-ID": {"name": "Last-Event-ID", "in": "header", "required": False,
                      "description": "SSE only: resume after this event id (what EventSource sends by itself)",
                      "schema": {"type": "string"}},
}
SESSION = ref("Session")
TURN = ref("Turn")
BATCH = ref("BatchResource")
BODY_ERRORS = (400, 413, 415)

OPERATIONS: dict[str, Op] = {
    "health.healthz": Op("Liveness: the process is up", {200: json_response("up", ref("Health"))},
                         public=True, tag="health"),
    "health.readyz": Op("Readiness: Postgres and Redis answer",
                        {200: json_response("ready", ref("Health"))}, errors=(503,), public=True, tag="health",
                        description="A 503 is `database_unavailable` (or `redis_unavailable` when only Redis "
                                    "failed), with `failed` listing each dependency that did not answer."),
    "metrics.scrape": Op("Prometheus metrics (text exposition format)",
                         {200: Response("the metrics", {"text/plain": {"type": "string"}})}, errors=(401,),
                         public=True, tag="health",
                         description="Aggregates only (no owner data). Open unless CCD_METRICS_TOKEN is set; then "
                                     "send `Authorization: Bearer <CCD_METRICS_TOKEN>` (that token, not a JWT)."),
    "static": Op("Static files of the web console", {200: Response("the file", {"*/*": BINARY})},
                 errors=(404,), public=True, tag="console"),
    "console.index": Op("The web console: a page that uses this API from the browser with a pasted token",
                        {200: Response("the page", {"text/html": {"type": "string"}})}, public=True, tag="console"),
    "console.static": Op("The web console's script and stylesheet", {200: Response("the file", {"*/*": BINARY})},
                         errors=(404,), public=True, tag="console"),
    "docs.openapi_document": Op("This document", {200: json_response("the OpenAPI 3.1 document", {"type": "object"})},
                       public=True, tag="docs"),
    "docs.docs_page": Op("Interactive documentation (Swagger UI) of this document",
                         {200: Response("the page", {"text/html": {"type": "string"}})},
                         public=True, tag="docs"),
    "docs.docs_asset": Op("A static file of the documentation page",
                          {200: Response("the file", {"*/*": BINARY})}, errors=(404,), public=True, tag="docs"),
    "api.create_session": Op(
        "Create a session", {201: json_response("created; a worker starts its container", SESSION)},
        body=schemas.CreateSession, headers=("Idempotency-Key",), errors=(409, 422, 429), tag="sessions",
        description="An empty body takes every default. The container starts in the background: "
                    "the session is `creating` until it is `ready`."),
    "api.list_sessions": Op("List your sessions", {200: json_response("a page", page_of("Session"))},
                            query=schemas.SessionListQuery, errors=(422,), tag="sessions"),
    "api.get_session": Op("Show a session with its latest turn", {200: json_response("the session", SESSION)},
                          tag="sessions"),
    "api.spawn": Op(
        "Spawn a child session, optionally with a first prompt",
        {201: json_response("the child (with `turn`: its first turn, or null)", SESSION)},
        body=schemas.SpawnRequest, headers=("Idempotency-Key",), errors=(402, 409, 422, 429), tag="sessions"),
    "api.list_children": Op("The session's children (the whole tree below it with recursive=true)",
                            {200: json_response("children", {"type": "object", "required": ["items"], "properties": {
                                "items": {"type": "array", "items": SESSION},
                                "tree_cost_usd": {"type": "number"}}})},
                            query=schemas.ChildrenQuery, tag="sessions"),
    "api.stop_session": Op("Stop the container (and its descendants'); the next chat restarts it",
                           {202: json_response("stopping", SESSION)}, errors=(409,), tag="sessions"),
    "api.delete_session": Op("Delete the session, its descendants, containers, volumes and events",
                             {202: json_response("deleting", SESSION)}, errors=(409,), tag="sessions"),
    "api.chat": Op(
        "Send a prompt: queue a turn",
        {202: json_response("queued (or still running when `wait` ran out)", TURN),
         200: Response("the turn ended within `wait` (JSON); or, with `stream: true`, its events as they happen "
                       "(NDJSON, or SSE with Accept: text/event-stream) through its final event",
                       {JSON: TURN, NDJSON: STREAM_TEXT, SSE: STREAM_TEXT})},
        body=schemas.ChatRequest, body_required=True, headers=("Idempotency-Key",), errors=(402, 409, 429),
        tag="turns",
        description="Turns of one session run one at a time, in order. `wait` holds the request up to that many "
                    "seconds (capped by CCD_MAX_WAIT_SECONDS). `stream: true` answers with the turn's event "
                    "envelopes, one JSON object per line (or SSE frames), ending after turn.completed, "
                    "turn.failed or turn.cancelled; the header X-Turn-Id names the turn."),
    "api.list_turns": Op("List a session's turns", {200: json_response("a page", page_of("Turn"))},
                         query=schemas.PageQuery, errors=(422,), tag="turns"),
    "api.get_turn": Op("Show a turn", {200: json_response("the turn (ended, or as it is when `wait` ran out)", TURN)},
                       query=schemas.TurnQuery, tag="turns"),
    "api.cancel_turn": Op("Cancel a turn", {200: json_response("it was queued: cancelled now", TURN),
                                            202: json_response("it is running: its worker interrupts it", TURN)},
                          errors=(409,), tag="turns"),
    "api.events": Op(
        "A session's events: a page, or live Server-Sent Events",
        {200: Response("a page of events (JSON), or an SSE stream with Accept: text/event-stream",
                       {JSON: ref("EventsPage"), SSE: STREAM_TEXT})},
        query=schemas.EventsQuery, headers=("Last-Event-ID",), errors=(422,), tag="events",
        description="`since` is the last event id you have (none: from the start); `limit` events per page, "
                    "`next_since` is the cursor for the next one. `tree=true` merges the events of every "
                    "session below this one (ids are then tree cursors). `token` is for browsers (EventSource) "
                    "that cannot send the Authorization header.\n" + SSE_PROTOCOL),
    "api.stream": Op(
        "A session's events and commands over a WebSocket",
        {101: Response("switching protocols: the WebSocket is open", {})},
        query=schemas.EventsQuery, tag="events", description=WS_PROTOCOL),
    "api.download_workspace": Op("Download the workspace as tar.gz",
                                 {200: Response("the archive", {"application/gzip": BINARY})},
                                 errors=(409, 413, 503), tag="files",
                                 description="At most CCD_MAX_DOWNLOAD_BYTES, of files adding up to at most "
                                             "CCD_MAX_UNPACKED_BYTES (413 `download_too_large`)."),
    "api.upload_archive": Op(
        "Unpack a tar (plain, gzip, bzip2 or xz) into the workspace",
        {200: json_response("unpacked", ref("FilesWritten"))},
        body_content={"application/gzip": BINARY, "application/x-tar": BINARY, "application/octet-stream": BINARY},
        body_required=True, errors=(409, 413, 422, 503), tag="files",
        description="At most CCD_MAX_UPLOAD_BYTES; at most CCD_MAX_UNPACKED_BYTES decompressed and "
                    "CCD_MAX_ARCHIVE_MEMBERS members (413 `archive_too_large`); only regular files and directories, "
                    "all inside the workspace (a link, device, fifo or sparse file is 422 `invalid_archive`). "
                    "Nothing is written when it is refused."),
    "api.get_file": Op("Download one workspace file", {200: Response("its bytes", {"application/octet-stream": BINARY})},
                       errors=(409, 413, 503), tag="files",
                       description="`path` is relative to /workspace; an absolute path or a `..` part is a 400. "
                                   "At most CCD_MAX_DOWNLOAD_BYTES (413 `download_too_large`)."),
    "api.put_file": Op("Write one workspace file", {200: json_response("written", ref("FileWritten"))},
                       body_content={"application/octet-stream": BINARY}, body_required=True,
                       errors=(409, 413, 503), tag="files",
                       description="At most CCD_MAX_UPLOAD_BYTES; parent directories are made."),
    "api.create_batch": Op(
        "Submit a batch of prompts", {202: json_response("stored; the first items start", BATCH)},
        body=schemas.CreateBatch, body_required=True, headers=("Idempotency-Key",),
        body_content={NDJSON: {"type": "string", "description": "one BatchItemSpec per line"}},
        query=schemas.BatchOptions, errors=(402, 409, 422, 429), tag="batches",
        description="A JSON object {items, concurrency, webhook}, a bare JSON array of items, or NDJSON (one item "
                    "per line; options then come from the query string). Each item is a `BatchItemSpec`: a prompt "
                    "and either session_id or config. Every item is checked before anything is stored. At most "
                    f"{schemas.MAX_BATCH_ITEMS} items and CCD_MAX_BATCH_BYTES bytes."),
    "api.list_batches": Op("List your batches", {200: json_response("a page", page_of("BatchResource"))},
                           query=schemas.PageQuery, errors=(422,), tag="batches"),
    "api.get_batch": Op("Show a batch", {200: json_response("the batch", BATCH)}, tag="batches"),
    "api.cancel_batch": Op("Cancel every unfinished item of a batch", {202: json_response("cancelling", BATCH)},
                           errors=(409,), tag="batches"),
    "api.batch_results": Op(
        "A batch's results as NDJSON", {200: Response("one JSON object per finished item", {NDJSON: STREAM_TEXT})},
        query=schemas.ResultsQuery, tag="batches",
        description="One line per finished item, in the order they finished: index, custom_id, session_id, "
                    "turn_id, status, result, usage, cost_usd (metered), reported_cost_usd, duration_ms, error. "
                    "`follow=true` keeps the response open until the batch has ended."),
    "api.revoke_token": Op(
        "Revoke a token", {200: json_response("revoked (or it had expired: revoked false)", ref("Revoked"))},
        body=RevokeRequest, errors=(422,), tag="tokens",
        description="Empty body: the token presented. `token`: another token of yours. `jti` + `exp`: a token id "
                    "of yours, until `exp`. A revoked token gets 401 `token_revoked`."),
    "api.answer_approval": Op(
        "Answer a permission prompt: allow (optionally with an edited input, or remembering it) or deny",
        {200: json_response("the approval, resolved", ref("Approval"))},
        body=schemas.ApprovalAnswer, body_required=True, errors=(409, 422), tag="turns",
        description="`request_id` is the one in the `approval.requested` event (and in the turn's "
                    "`pending_approvals`). The answer is the `approval.resolved` event on the session's stream, and "
                    "the turn's Claude Code goes on at once. An answer to one answered already, timed out or whose "
                    "turn ended is a 409 `approval_resolved`; `updated_input` or `remember` with deny a 422 "
                    "`invalid_answer`. `remember` adds the prompt's suggested rules (or the tool) to the session's "
                    "allowed rules. Only the owner's tokens may answer (a session token: 403 `forbidden`)."),
    "api.list_approvals": Op(
        "A turn's permission prompts, answered or not, oldest first",
        {200: json_response("the approvals", {"type": "object", "required": ["approvals"], "properties": {
            "approvals": {"type": "array", "items": ref("Approval")}}})}, tag="turns"),
}

EXTRA_MODELS: tuple[type[BaseModel], ...] = (
    Event, EventsPage, BatchResource, Revoked, FilesWritten, FileWritten, Health, ErrorBody, Totals,
    schemas.BatchItemSpec)
RULE_ARG = re.compile(r"<(?:([A-Za-z_][A-Za-z0-9_]*)(?:\([^)]*\))?:)?([A-Za-z_][A-Za-z0-9_]*)>")


def openapi_path(rule: str) -> tuple[str, list[tuple[str, str]]]:
    """/a/<x>/<path:y> → (/a/{x}/{y}, [(x, default), (y, path)])."""
    args = [(m.group(2), m.group(1) or "default") for m in RULE_ARG.finditer(rule)]
    return RULE_ARG.sub(lambda m: "{" + m.group(2) + "}", rule), args


def documented_rules(app: Flask):
    """Every rule of the URL map, with the methods a client calls."""
    for rule in app.url_map.iter_rules():
        yield rule, sorted((rule.methods or set()) - IMPLICIT_METHODS)


def undocumented(app: Flask) -> list[str]:
    """Rules whose endpoint has no entry in OPERATIONS."""
    return [f"{rule.rule} ({rule.endpoint})" for rule, _ in documented_rules(app) if rule.endpoint not in OPERATIONS]


def query_parameters(model: type[BaseModel]) -> list[dict]:
    schema = model.model_json_schema(ref_template=REF)
    required = set(schema.get("required", []))
    params = []
    for name, prop in schema["properties"].items():
        description = prop.pop("description", None)
        prop.pop("title", None)
        prop = without_null(prop)
        param = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            param["description"] = description
        params.append(param)
    return params


def without_null(prop: dict) -> dict:
    """A query parameter is absent or a string, never null: `X | None = None` documents as X."""
    branches = [b for b in prop.get("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        prop = {**{k: v for k, v in prop.items() if k != "anyOf"}, **branches[0]}
    if prop.get("default", 0) is None:
        prop.pop("default")
    return prop


def error_statuses(op: Op, path_args: list, has_body: bool) -> list[int]:
    statuses = set(op.errors)
    if not op.public:
        statuses |= {400, 401, 403, 503}  # a bad or out-of-scope token; Postgres or Redis away
    if path_args:
        statuses |= {404}
    if has_body:
        statuses |= set(BODY_ERRORS)
    if op.query is not None:
        statuses |= {400}
    return sorted(statuses)


def operation(endpoint: str, op: Op, method: str, path_args: list) -> dict:
    out: dict[str, Any] = {"operationId": endpoint.replace(".", "_"), "summary": op.summary}
    if op.description:
        out["description"] = op.description
    if op.tag:
        out["tags"] = [op.tag]
    params = [{"name": name, "in": "path", "required": True,
               "schema": {"type": "string", "minLength": 1},
               **({"description": "a path inside the workspace (may contain /)"} if conv in ("path", "anypath")
                  else {})} for name, conv in path_args]
    if op.query is not None:
        params += query_parameters(op.query)
    params += [HEADERS[h] for h in op.headers]
    if params:
        out["parameters"] = params
    content = {}
    if op.body is not None:
        content[JSON] = {"schema": ref(op.body.__name__)}
    for media, schema in (op.body_content or {}).items():
        content[media] = {"schema": schema}
    if content:
        out["requestBody"] = {"required": op.body_required, "content": content}
    responses: dict[str, Any] = {}
    for status, resp in op.responses.items():
        responses[str(status)] = {"description": resp.description,
                                  **({"content": {m: {"schema": s} for m, s in resp.content.items()}}
                                     if resp.content else {})}
    for status in error_statuses(op, path_args, bool(content)):
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    out["responses"] = responses
    if op.public:
        out["security"] = []
    return out


def component_schemas() -> dict[str, dict]:
    models = {op.body for op in OPERATIONS.values() if op.body} | {op.query for op in OPERATIONS.values() if op.query}
    models |= set(EXTRA_MODELS)
    _, defs = models_json_schema([(m, "validation") for m in sorted(models, key=lambda m: m.__name__)],
                                 ref_template=REF)
    found = dict(defs.get("$defs", {}))
    # Both are validated item by item (or key by key) in the route, for better error fields; documented as such.
    found["CreateBatch"]["properties"]["items"]["items"] = ref("BatchItemSpec")
    # What the models' own validators check across fields, in schema terms.
    found["BatchItemSpec"]["oneOf"] = [
        {"required": ["session_id"], "properties": {"session_id": {"type": "string"}}},
        {"required": ["config"], "properties": {"config": {"type": "object"}}}]
    found["Workspace"]["oneOf"] = [
        {"required": ["type", "name"], "properties": {"type": {"const": "persistent"}, "name": {"type": "string"}}},
        {"properties": {"type": {"const": "ephemeral"}, "name": {"type": "null"}}}]
    found["SpawnRequest"]["properties"]["config"] = {**ref("SessionConfig"),
                                                     "description": "keys that replace the parent's config"}
    found["Turn"] = turn_schema()
    found["Approval"] = approval_schema()
    found["Session"] = session_schema(ref("Turn"))
    return found


def build(app: Flask) -> dict:
    """The whole document for this app."""
    paths: dict[str, dict] = {}
    for rule, methods in documented_rules(app):
        path, args = openapi_path(rule.rule)
        op = OPERATIONS.get(rule.endpoint) or Op("undocumented", {200: Response("undocumented")})
        for method in methods:
            paths.setdefault(path, {})[method.lower()] = operation(rule.endpoint, op, method, args)
    error = {"content": {JSON: {"schema": ref("ErrorBody")}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "cc-docker", "version": "1",
                 "description": "Runs Claude Code sessions in Docker containers. Every error is "
                                "{\"error\": {\"code\", \"message\", ...}} with a stable code; every event, from "
                                "any endpoint, is an `Event` envelope."},
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": component_schemas(),
            "responses": {f"E{s}": {"description": text, **error} for s, text in ERROR_TEXT.items()},
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                                               "description": "HS256 JWT with sub (the owner) and exp; "
                                                              "mint one with `ccd token`"}},
        },
        "security": [{"bearerAuth": []}],
    }
