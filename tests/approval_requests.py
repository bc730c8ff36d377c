"""Pending tool approvals on a real running turn, opened as the worker opens them (core.approvals), for the
clients' tests: the console, the Python client and ccd answer them through the real API."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from core.approvals import open_approval, requested_event
from core.db import make_engine, make_session_factory, transaction
from core.events import EventLog

# Claude Code's permission suggestion for a Bash command: what "remember" turns into a session rule.
SUGGESTIONS = [{"type": "addRules", "rules": [{"toolName": "Bash", "ruleContent": "echo:*"}],
                "behavior": "allow", "destination": "session"}]


class Approvals:
    """Opens approvals in the run's database and, like the worker, publishes their approval.requested."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.engine = make_engine(settings)
        self.factory = make_session_factory(self.engine)
        self.events = EventLog.from_settings(settings)

    def open(self, turn: dict, request_id: str, command: str, publish: bool = True, minutes: int = 10) -> dict:
        """A pending Bash approval for `command` on `turn` (a turn resource); returns approval.requested's data."""
        deadline = datetime.now(timezone.utc) + timedelta(minutes=minutes)
        with transaction(self.factory) as db:
            approval = open_approval(db, turn_id=uuid.UUID(turn["id"]), session_id=uuid.UUID(turn["session_id"]),
                                     request_id=request_id,
                                     tool_name="Bash", input={"command": command, "description": "a test command"},
                                     suggestions=SUGGESTIONS, deadline=deadline)
            event = requested_event(approval, turn["seq"])
        if publish:
            self.events.publish(event)
        return event.data

    def session_rules(self, session_id: str) -> list[str]:
        """The session's remembered approval rules, as stored."""
        from core.models import Session

        with transaction(self.factory) as db:
            return list(db.get(Session, uuid.UUID(session_id)).approval_rules or [])

    def close(self) -> None:
        self.engine.dispose()
