"""What a turn can be and why it ended: its statuses, the stable reasons, and an ending that names both."""
from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class TurnStatus(StrEnum):
    """A turn's status; the values are what Postgres, the API and events carry (StrEnum: they stay plain strings)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"


class TurnReason(StrEnum):
    """Why a turn did not succeed: the stable code in its `reason` and its final event (README: Turns)."""

    WORKER_LOST = "worker_lost"  # no worker of its host took the turn over in time
    CONTAINER_LOST = "container_lost"  # its container stopped or was removed during the turn
    CONTAINER_ERROR = "container_error"  # the container could not run the turn
    PROCESS_LOST = "process_lost"  # the turn's process ended without reporting
    OUT_OF_MEMORY = "out_of_memory"
    OUTPUT_LIMIT = "output_limit"
    DISK_QUOTA = "disk_quota"  # the service stopped its session for its volumes' size
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    CLAUDE_ERROR = "claude_error"
    EXIT_CODE = "exit_code"
    INVALID_OUTPUT = "invalid_output"
    NO_RESULT = "no_result"


FINISHED_TURN_STATUSES = (TurnStatus.SUCCEEDED, TurnStatus.FAILED, TurnStatus.CANCELLED, TurnStatus.TIMED_OUT)
UNFINISHED_TURN_STATUSES = (TurnStatus.QUEUED, TurnStatus.RUNNING)

# The event that ends a turn, by its final status; every other one ends it turn.failed.
FINAL_EVENT_TYPES = {TurnStatus.SUCCEEDED: "turn.completed", TurnStatus.CANCELLED: "turn.cancelled"}


def final_event_type(status: str) -> str:
    """The event that ends a turn with this status: turn.completed, turn.cancelled or turn.failed."""
    return FINAL_EVENT_TYPES.get(status, "turn.failed")


class Ending(NamedTuple):
    """How a turn ended: its final status, what went wrong (None on success) and the stable reason for it."""

    status: TurnStatus
    error: str | None = None
    reason: TurnReason | None = None

    @property
    def event_type(self) -> str:
        return final_event_type(self.status)

    def event_data(self, **extra) -> dict:
        """The final event's data: status, error and reason, and what the caller adds (result, usage, cost)."""
        return {"status": self.status, "error": self.error, "reason": self.reason, **extra}


SUCCEEDED = Ending(TurnStatus.SUCCEEDED)
CANCELLED_BY_REQUEST = Ending(TurnStatus.CANCELLED, "cancelled by request", TurnReason.CANCELLED)
