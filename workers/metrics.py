"""The worker's turn metrics: turns finished, turn duration, time to first event, events published.

Observed by the turn runner in the prefork children; the worker's main process serves them (multiprocess
mode, see workers/health_server.py). Time is taken on the claimed turn itself, so nothing here is shared
between turns.
"""
from __future__ import annotations

import time

from prometheus_client import Counter, Histogram

from core.claimed import ClaimedTurn
from core.envelope import SERVICE_TYPES

# Claude Code's stream-json line types; any other becomes "claude.other", so the label set stays bounded.
CLAUDE_TYPES = frozenset({"system", "assistant", "user", "stream_event", "result"})
TURN_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
FIRST_EVENT_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)

TURNS_FINISHED = Counter("ccd_turns_finished_total", "Turns this worker carried to a final status, by status",
                         ["status"])
TURN_DURATION = Histogram("ccd_turn_duration_seconds",
                          "Seconds from a worker taking a turn to its final status (a re-attached turn: from the "
                          "re-attach), by final status", ["status"], buckets=TURN_BUCKETS)
TIME_TO_FIRST_EVENT = Histogram("ccd_turn_first_event_seconds",
                                "Seconds from a worker taking a turn to its first Claude Code event (container "
                                "start, Claude Code start-up, the model's first answer), by final status",
                                ["status"], buckets=FIRST_EVENT_BUCKETS)
EVENTS_PUBLISHED = Counter("ccd_events_published_total", "Events of turns this worker published, by type", ["type"])


def event_type_label(kind: str) -> str:
    """The event type as a label: service types as they are, Claude Code's known types, else claude.other."""
    if kind in SERVICE_TYPES or kind.removeprefix("claude.") in CLAUDE_TYPES:
        return kind
    return "claude.other"


def turn_taken(turn: ClaimedTurn) -> None:
    """Notes when this worker took the turn."""
    turn.taken_at = time.monotonic()


def event_published(turn: ClaimedTurn, kind: str) -> None:
    """Counts one published event; the first Claude Code event of a fresh turn fixes its time to first event."""
    EVENTS_PUBLISHED.labels(event_type_label(kind)).inc()
    if kind.startswith("claude.") and not turn.resumed and turn.first_event_at is None:
        turn.first_event_at = time.monotonic()


def turn_finished(turn: ClaimedTurn, status: str) -> None:
    """Counts a turn this worker ended, with its duration and time to first event (when it had one)."""
    TURNS_FINISHED.labels(status).inc()
    taken = turn.taken_at
    if taken is None:
        return
    TURN_DURATION.labels(status).observe(time.monotonic() - taken)
    if turn.first_event_at is not None:
        TIME_TO_FIRST_EVENT.labels(status).observe(turn.first_event_at - taken)
