"""Reads the wrapper's numbered lines, bounds what a turn may print, and decides how it ended."""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from core.pricing import MICRO_DOLLAR
from core.turn_states import CANCELLED_BY_REQUEST, SUCCEEDED, Ending, TurnReason, TurnStatus

FAILED = TurnStatus.FAILED

# How much of an oversized line an event keeps, so a reader still sees what it was.
TRUNCATED_HEAD_CHARS = 2048
LINE_TYPE = re.compile(r'"type"\s*:\s*"([A-Za-z_]{1,40})"')
MAX_COST_USD = Decimal("99999999.999999")  # what a cost column (Numeric(14, 6)) holds
MAX_INT4 = 2 ** 31 - 1


def finite_float(text: str) -> float | None:
    """A JSON number as a float; None for one too large to be finite (1e400), as JavaScript would not write it."""
    value = float(text)
    return value if math.isfinite(value) else None


def parse_line(text: str) -> Any:
    """A line of Claude Code's as JSON, with NaN, Infinity and overflowing numbers read as null (JSON.stringify
    writes null for them), so that whatever the agent prints can be stored and sent on as standard JSON."""
    return json.loads(text, parse_constant=lambda _name: None, parse_float=finite_float)


def reported_cost(value: Any) -> Decimal | None:
    """The cost a result line reports, as a figure to show: a number clamped into what the column holds,
    rounded as it stores it; None for anything else (a string, a boolean, null)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    cost = Decimal(value) if isinstance(value, int) else Decimal(repr(value))
    return max(-MAX_COST_USD, min(MAX_COST_USD, cost)).quantize(MICRO_DOLLAR)


def storable(value: Any) -> Any:
    """The value with every NUL in its strings (keys too) replaced: Postgres text and JSONB refuse NUL."""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [storable(v) for v in value]
    return value


def reported_figures(result: dict[str, Any] | None, cost_before: Any = None) -> dict[str, Any]:
    """What a turn's row and final event show of its result line, each value made to fit its column. The line may
    be the agent's own forgery (it can write to Claude Code's stdout): shown, never counted, never a failed write.
    `cost_before`: a hot process reports its cost so far, not the turn's; this is what it had reported before."""
    result = result or {}
    cost = reported_cost(result.get("total_cost_usd"))
    before = reported_cost(cost_before)
    if cost is not None and before is not None and before > 0:
        cost = max(Decimal(0), cost - before)
    text, usage, duration = result.get("result"), result.get("usage"), result.get("duration_ms")
    if text is not None and not isinstance(text, str):
        text = json.dumps(text)
    if isinstance(duration, float) and duration.is_integer():
        duration = int(duration)
    return {"result": storable(text), "usage": storable(usage) if isinstance(usage, dict) and usage else None,
            "reported_cost_usd": cost,
            "duration_ms": duration if isinstance(duration, int) and not isinstance(duration, bool)
            and 0 <= duration <= MAX_INT4 else None}


@dataclass
class TurnOutput:
    """What a turn printed so far: the result line, the exit record, sizes, and anything malformed.

    `max_bytes` bounds the whole turn's output: past it `over_limit` is set and nothing more is
    passed on (the runner then stops the turn). `max_event` bounds one line as passed on.
    """

    max_bytes: int = 0
    max_event: int = 0
    result: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    saw_init: bool = False
    invalid: str | None = None
    lines: int = 0
    number: int = 0  # the wrapper's number of the last Claude Code line taken
    total_bytes: int = 0
    truncated: int = 0
    over_limit: bool = False
    unknown: list[str] = field(default_factory=list)

    def take(self, record: str, size: int | None = None, cut: bool = False) -> dict[str, Any] | None:
        """Consumes one wrapper record; returns the event data for the Claude Code line it carried, if any.

        `size` is the record's length in bytes as printed, and `cut` says the reader kept only its start.
        A line longer than `max_event` is still read (for the result and init lines), but what is
        passed on is a truncated marker.
        """
        tag, sep, text = record.partition("\t")
        if not sep:
            self.unknown.append(record[:200])
            return None
        if tag == "exit":
            try:
                self.exit = json.loads(text)
            except ValueError:
                self.exit = {"code": None, "stderr": text[-2000:]}
            return None
        self.lines += 1
        self.number = int(tag) if tag.isdigit() else self.number + 1
        size = size if size is not None else len(record)
        self.total_bytes += size
        if self.max_bytes and self.total_bytes > self.max_bytes:
            self.over_limit = True
        if self.over_limit:
            return None
        if cut:
            self.truncated += 1
            return truncated_line(text, size - len(tag) - 1)
        try:
            line = parse_line(text)
        except (ValueError, RecursionError):
            line = None
        if not isinstance(line, dict) or not isinstance(line.get("type"), str):
            if self.invalid is None:
                self.invalid = f"Claude Code printed a line that is not a JSON object: {text[:200]!r}"
            return None
        if line["type"] == "result":
            self.result = line
        elif line["type"] == "system" and line.get("subtype") == "init":
            self.saw_init = True
        if self.max_event and size > self.max_event:
            self.truncated += 1
            return truncated_line(text, size - len(tag) - 1)
        return line

    def outcome(self) -> Ending:
        """How the finished turn ended: its status, error and stable reason (None on success)."""
        if self.over_limit:
            return Ending(FAILED, f"the turn printed more than {self.max_bytes} bytes and was stopped",
                          TurnReason.OUTPUT_LIMIT)
        code = (self.exit or {}).get("code")
        stderr = ((self.exit or {}).get("stderr") or "").strip()
        if self.exit is None:
            return Ending(FAILED, "the turn's process ended without reporting (container stopped or removed?)",
                          TurnReason.PROCESS_LOST)
        if self.exit.get("cancelled"):
            return CANCELLED_BY_REQUEST
        if self.exit.get("timed_out"):
            return Ending(TurnStatus.TIMED_OUT, "the turn ran past its timeout and was stopped", TurnReason.TIMEOUT)
        if self.exit.get("oom_killed") and (code != 0 or self.result is None):
            return Ending(FAILED, f"a process of the turn was killed for using more than the session's memory "
                                  f"limit (Claude Code exit code {code}); raise config.limits.memory_mb",
                          TurnReason.OUT_OF_MEMORY)
        if self.exit.get("process_lost"):
            return Ending(FAILED, f"Claude Code's process ended during the turn (exit code {code}: killed or crashed); "
                                  "the next turn starts a new one and resumes the conversation", TurnReason.PROCESS_LOST)
        if self.invalid:
            return Ending(FAILED, self.invalid, TurnReason.INVALID_OUTPUT)
        if self.result is not None and self.result.get("is_error"):
            detail = self.result.get("result") or self.result.get("subtype") or "error"
            errors = self.result.get("errors")
            if isinstance(errors, list) and errors:  # what went wrong, when Claude Code says (error_during_execution)
                detail = f"{detail} ({'; '.join(str(e) for e in errors)[:1000]})"
            status = self.result.get("api_error_status")
            return Ending(FAILED, f"Claude Code reported an error{f' (model API status {status})' if status else ''}: "
                                  f"{detail}", TurnReason.CLAUDE_ERROR)
        if code != 0:
            tail = stderr.splitlines()[-1] if stderr else "no error output"
            return Ending(FAILED, f"Claude Code exited with code {code}: {tail}", TurnReason.EXIT_CODE)
        if self.result is None:
            return Ending(FAILED, "Claude Code finished without a result line", TurnReason.NO_RESULT)
        return SUCCEEDED


def truncated_line(text: str, size: int) -> dict[str, Any]:
    """What an event carries for a line too large to pass on: its type, its size, and its start."""
    head = text[:TRUNCATED_HEAD_CHARS]
    found = LINE_TYPE.search(head)
    return {"type": found.group(1) if found else "unknown",
            "ccd_truncated": {"original_bytes": size, "head": head}}
