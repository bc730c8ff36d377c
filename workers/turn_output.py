"""Reads the wrapper's numbered lines and decides how a turn ended."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TurnOutput:
    """What a turn printed so far: the result line, the exit record, and anything malformed."""

    result: dict[str, Any] | None = None
    exit: dict[str, Any] | None = None
    saw_init: bool = False
    invalid: str | None = None
    lines: int = 0
    unknown: list[str] = field(default_factory=list)

    def take(self, record: str) -> dict[str, Any] | None:
        """Consumes one wrapper record; returns the Claude Code line it carried, if any."""
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
        try:
            line = json.loads(text)
        except ValueError:
            line = None
        if not isinstance(line, dict) or not isinstance(line.get("type"), str):
            if self.invalid is None:
                self.invalid = f"Claude Code printed a line that is not a JSON object: {text[:200]!r}"
            return None
        if line["type"] == "result":
            self.result = line
        elif line["type"] == "system" and line.get("subtype") == "init":
            self.saw_init = True
        return line

    def outcome(self) -> tuple[str, str | None]:
        """(status, error) for the finished turn."""
        code = (self.exit or {}).get("code")
        stderr = ((self.exit or {}).get("stderr") or "").strip()
        if self.exit is None:
            return "failed", "the turn's process ended without reporting (container stopped or removed?)"
        if self.exit.get("cancelled"):
            return "cancelled", "cancelled by request"
        if self.exit.get("timed_out"):
            return "timed_out", "the turn ran past its timeout and was stopped"
        if self.invalid:
            return "failed", self.invalid
        if self.result is not None and self.result.get("is_error"):
            detail = self.result.get("result") or self.result.get("subtype") or "error"
            status = self.result.get("api_error_status")
            return "failed", f"Claude Code reported an error{f' (model API status {status})' if status else ''}: {detail}"
        if code != 0:
            tail = stderr.splitlines()[-1] if stderr else "no error output"
            return "failed", f"Claude Code exited with code {code}: {tail}"
        if self.result is None:
            return "failed", "Claude Code finished without a result line"
        return "succeeded", None
