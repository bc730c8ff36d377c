"""The spawn tools the in-container MCP server offers: each one is a call to the cc-docker API
($CCD_API_URL, bearer $CCD_SESSION_TOKEN, for session $CCD_SESSION_ID); every failure comes back
as a tool result with isError set, so the model reads what went wrong."""
from __future__ import annotations

import json
import logging
import math
import socket
import time
import urllib.parse
from typing import Any, Callable

Progress = Callable[[str], None]  # tells the client a long tool call is still alive
log = logging.getLogger("ccd.mcp")

FINISHED = ("succeeded", "failed", "cancelled", "timed_out")
LONGEST_WAIT = 30  # seconds one GET /turns/<id>?wait=N may hold
HTTP_SLACK = 30  # seconds an answer may take beyond the wait it was asked for


class ToolError(Exception):
    """A failure the model should read: it becomes a tool result with isError set."""


class Api:
    """The few cc-docker API calls the tools make, with errors turned into ToolError."""

    def __init__(self, base_url: str, token: str, session_id: str, token_file: str = "") -> None:
        self.base_url = base_url.rstrip("/")
        self._token = token
        self.token_file = token_file
        self.session_id = session_id

    @classmethod
    def from_env(cls, env: dict[str, str]) -> "Api":
        return cls(env.get("CCD_API_URL", ""), env.get("CCD_SESSION_TOKEN", ""), env.get("CCD_SESSION_ID", ""),
                   env.get("CCD_SESSION_TOKEN_FILE", ""))

    @property
    def token(self) -> str:
        """The session token: read again on every call when it lives in a file (a hot process's MCP server runs
        for many turns, and each turn renews the token there)."""
        if self.token_file:
            try:
                with open(self.token_file, encoding="utf-8") as file:
                    return file.read().strip()
            except OSError:
                pass
        return self._token

    def own_session(self) -> str:
        """This session's id, which spawning and listing children need."""
        if not self.session_id:
            raise ToolError("CCD_SESSION_ID is not set, so this session cannot spawn or list children")
        return self.session_id

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30.0) -> dict:
        """One API request; the decoded JSON answer, or ToolError saying what went wrong."""
        if not self.base_url:
            raise ToolError("CCD_API_URL is not set, so the cc-docker API cannot be reached")
        # Imported on the first call: the MCP server starts with every turn, and most turns spawn nothing.
        import urllib.error
        import urllib.request

        url = self.base_url + path
        headers = {"Accept": "application/json", "Authorization": f"Bearer {self.token}"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise ToolError(refusal(exc.code, exc.read())) from None
        except urllib.error.URLError as exc:
            reason = exc.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise ToolError(f"cc-docker did not answer {method} {path} within {timeout:.0f} s") from None
            raise ToolError(f"cannot reach the cc-docker API at {self.base_url}: {reason}") from None
        except (TimeoutError, socket.timeout):
            raise ToolError(f"cc-docker did not answer {method} {path} within {timeout:.0f} s") from None
        except OSError as exc:  # a connection reset mid-answer, and the like
            raise ToolError(f"cannot reach the cc-docker API at {self.base_url}: {exc}") from None
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            raise ToolError(f"cc-docker answered {method} {path} with something that is not JSON") from None
        if not isinstance(answer, dict):
            raise ToolError(f"cc-docker answered {method} {path} with JSON that is not an object")
        return answer


def refusal(status: int, raw: bytes) -> str:
    """The text of an API error answer: `cc-docker refused: <message> (<code>, HTTP <status>)`."""
    try:
        error = json.loads(raw)["error"]
        return f"cc-docker refused: {error['message']} ({error['code']}, HTTP {status})"
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()[:300]
        return f"cc-docker refused with HTTP {status}" + (f": {text}" if text else "")


def path_id(value: str) -> str:
    """An id made safe for a URL path segment."""
    return urllib.parse.quote(value, safe="")


# --- the tools ---------------------------------------------------------------------------------

def spawn_child(api: Api, args: dict, progress: Progress) -> dict:
    """Spawns a child session (and its first turn when there is a prompt); waits if asked."""
    body = {key: args[key] for key in ("prompt", "config") if key in args}
    child = api.call("POST", f"/api/v1/sessions/{path_id(api.own_session())}/spawn", body)
    turn = child.get("turn") or None
    wait_seconds = args.get("wait_seconds", 0)
    if wait_seconds > 0 and turn:
        return wait_for_turn(api, child["id"], turn, wait_seconds, progress, spawned=True)
    return {"session_id": child.get("id"), "turn_id": turn.get("id") if turn else None,
            "status": turn.get("status") if turn else child.get("status"), "depth": child.get("depth")}


def send_message(api: Api, args: dict, progress: Progress) -> dict:
    """Queues a new turn with `prompt` on a child session."""
    session_id = args["session_id"]
    turn = api.call("POST", f"/api/v1/sessions/{path_id(session_id)}/chat", {"prompt": args["prompt"]})
    return {"session_id": session_id, "turn_id": turn.get("id"), "status": turn.get("status")}


def wait_for_child(api: Api, args: dict, progress: Progress) -> dict:
    """Waits for a child's turn (its latest one unless turn_id is given) to finish."""
    session_id = args["session_id"]
    timeout = args.get("timeout_seconds", 300)
    if "turn_id" in args:
        return wait_for_turn(api, session_id, {"id": args["turn_id"]}, timeout, progress)
    session = api.call("GET", f"/api/v1/sessions/{path_id(session_id)}")
    latest = session.get("latest_turn")
    if not latest:
        raise ToolError("that child has no turn yet: give it one with send_message")
    return wait_for_turn(api, session_id, latest, timeout, progress)


def wait_for_turn(api: Api, session_id: str, turn: dict, timeout: float, progress: Progress,
                  spawned: bool = False) -> dict:
    """Polls the turn with long-held GETs until it finishes or `timeout` seconds pass."""
    turn_id = turn["id"]
    deadline = time.monotonic() + timeout
    polled = False
    while turn.get("status") not in FINISHED:
        left = deadline - time.monotonic()
        if left <= 0:
            what = f"spawned child {session_id}, but its turn {turn_id}" if spawned else \
                f"turn {turn_id} of child {session_id}"
            raise ToolError(f"{what} is still {turn.get('status') or 'running'} after {timeout:.0f} s; "
                            f"call wait_for_child with session_id {session_id} and turn_id {turn_id} "
                            "to wait on it again")
        if polled:
            # Claude Code aborts a tool call silent for 30 min (stdio default); a wait may last an hour.
            progress(f"turn {turn_id} of child {session_id} is {turn.get('status')}")
        polled = True
        wait = max(1, min(LONGEST_WAIT, math.ceil(left)))
        turn = api.call("GET", f"/api/v1/turns/{path_id(turn_id)}?wait={wait}", timeout=wait + HTTP_SLACK)
    return {"session_id": session_id, "turn_id": turn_id, "status": turn.get("status"),
            "result": turn.get("result"), "error": turn.get("error"), "cost_usd": turn.get("cost_usd")}


def list_children(api: Api, args: dict, progress: Progress) -> list:
    """This session's direct children with the status of each one's latest turn."""
    answer = api.call("GET", f"/api/v1/sessions/{path_id(api.own_session())}/children")
    children = []
    for item in answer.get("items") or []:
        latest = item.get("latest_turn")
        children.append({"session_id": item.get("id"), "status": item.get("status"), "depth": item.get("depth"),
                         "latest_turn_status": latest.get("status") if isinstance(latest, dict) else None})
    return children


def schema(properties: dict, required: tuple[str, ...] = ()) -> dict:
    return {"type": "object", "properties": properties, "required": list(required), "additionalProperties": False}


SESSION_ID = {"type": "string", "minLength": 1, "description": "the child session's id"}

TOOLS: dict[str, tuple[str, dict, Callable[[Api, dict, Progress], Any]]] = {
    "spawn_child": (
        "Start a child Claude Code session (a copy of this session's setup, with `config` overrides) "
        "and give it `prompt` as its first turn; returns its session_id and turn_id, and with "
        "wait_seconds > 0 waits that long for the turn to finish and returns its result.",
        schema({
            "prompt": {"type": "string", "description": "the child's first task; omit to start it idle"},
            "config": {"type": "object", "description": "overrides of this session's config, e.g. {\"model\": ...}"},
            "wait_seconds": {"type": "integer", "minimum": 0, "maximum": 3600,
                             "description": "wait up to this long for the child's first turn (0: do not wait)"},
        }),
        spawn_child),
    "send_message": (
        "Send a child session another prompt; it runs after the child's earlier turns and returns "
        "the new turn's turn_id (wait for it with wait_for_child).",
        schema({"session_id": SESSION_ID, "prompt": {"type": "string", "minLength": 1}},
               ("session_id", "prompt")),
        send_message),
    "wait_for_child": (
        "Wait until a child's turn (its latest one, or turn_id) finishes and return its status, "
        "result text, error and cost; errors out if it is still running after timeout_seconds.",
        schema({"session_id": SESSION_ID,
                "turn_id": {"type": "string", "minLength": 1, "description": "the turn to wait for"},
                "timeout_seconds": {"type": "integer", "minimum": 1, "maximum": 3600, "default": 300}},
               ("session_id",)),
        wait_for_child),
    "list_children": (
        "List this session's child sessions with their status, depth and latest turn's status.",
        schema({}),
        list_children),
}


def check_arguments(spec: dict, args: Any) -> str | None:
    """Why `args` does not fit the tool's input schema (the subset our schemas use), or None."""
    if not isinstance(args, dict):
        return "arguments must be a JSON object"
    for name in spec["required"]:
        if name not in args:
            return f"missing required argument '{name}'"
    for name, value in args.items():
        prop = spec["properties"].get(name)
        if prop is None:
            known = ", ".join(spec["properties"]) or "none"
            return f"unknown argument '{name}' (this tool takes: {known})"
        kind = prop["type"]
        if kind == "string" and not isinstance(value, str):
            return f"argument '{name}' must be a string"
        if kind == "object" and not isinstance(value, dict):
            return f"argument '{name}' must be a JSON object"
        if kind == "integer":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    (isinstance(value, float) and not value.is_integer()):
                return f"argument '{name}' must be an integer"
            low, high = prop.get("minimum"), prop.get("maximum")
            if (low is not None and value < low) or (high is not None and value > high):
                return f"argument '{name}' must be between {low} and {high}"
        if kind == "string" and len(value) < prop.get("minLength", 0):
            return f"argument '{name}' must not be empty"
    return None


def call_tool(api: Api, name: str, args: Any, progress: Progress = lambda message: None) -> dict:
    """Runs one tool; every failure comes back as a result with isError set."""
    description, spec, handler = TOOLS[name]
    problem = check_arguments(spec, args)
    if problem:
        return tool_result(f"invalid arguments for {name}: {problem}", True)
    args = {k: int(v) if spec["properties"][k]["type"] == "integer" else v for k, v in args.items()}
    try:
        return tool_result(json.dumps(handler(api, args, progress)), False)
    except ToolError as exc:
        return tool_result(str(exc), True)
    except Exception as exc:  # a bug here must not take the server down with it
        log.exception("tool %s failed", name)
        return tool_result(f"{name} failed inside the ccd MCP server: {exc!r}", True)


def tool_result(text: str, is_error: bool) -> dict:
    return {"content": [{"type": "text", "text": text}], "isError": is_error}
