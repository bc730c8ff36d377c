"""Per-session limits: the defaults, the host-derived ceilings, and the check that refuses a request above them."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from core.errors import DomainError

if TYPE_CHECKING:
    from core.settings import Settings

# What a session that asks for nothing gets (config.limits).
DEFAULT_LIMITS = {"memory_mb": 2048, "cpus": 1.0, "pids": 512}

# (config group, key, the Settings attribute holding its ceiling, the setting an operator changes it with)
CEILINGS = (
    ("limits", "memory_mb", "max_memory_mb", "CCD_MAX_MEMORY_MB"),
    ("limits", "cpus", "max_cpus", "CCD_MAX_CPUS"),
    ("limits", "pids", "max_pids", "CCD_MAX_PIDS"),
    ("limits", "disk_mb", "max_disk_mb", "CCD_MAX_DISK_MB"),
    ("timeouts", "turn_seconds", "turn_ceiling", "CCD_MAX_TURN_SECONDS"),
    ("timeouts", "idle_seconds", "max_idle_seconds", "CCD_MAX_IDLE_SECONDS"),
)


class LimitExceeded(DomainError):
    """422: a per-session request above the operator's ceiling; `field` names it, `limit` is the ceiling."""

    status = 422
    code = "limit_exceeded"

    def __init__(self, message: str, *, field: str, limit: int | float) -> None:
        super().__init__(message, field=field)
        self.limit = limit


def host_memory_mb() -> int:
    """This machine's memory, never below a default session's (a small host still takes one)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20
    except (ValueError, OSError):
        total = 0
    return max(int(total), DEFAULT_LIMITS["memory_mb"])


def host_cpus() -> float:
    """This machine's CPUs, never below a default session's."""
    return max(float(os.cpu_count() or 1), DEFAULT_LIMITS["cpus"])


def check_ceilings(config: dict, settings: "Settings", prefix: str = "config.") -> None:
    """Refuses a session config (a validated SessionConfig dump) asking for more than a ceiling allows."""
    for group, key, ceiling_of, env in CEILINGS:
        value = (config.get(group) or {}).get(key)
        ceiling = getattr(settings, ceiling_of)
        if value is not None and value > ceiling:
            field = f"{prefix}{group}.{key}"
            raise LimitExceeded(f"{field} is {value}, above this server's ceiling of {ceiling} ({env})",
                                field=field, limit=ceiling)


def session_limits(config: dict, settings: "Settings") -> dict:
    """The container limits of a session: its config's over the defaults, never above the ceilings (a session
    accepted before an operator lowered one gets the new ceiling when its container is made)."""
    limits = {**DEFAULT_LIMITS, **(config.get("limits") or {})}
    for group, key, ceiling_of, _env in CEILINGS:
        if group == "limits" and key in limits:
            limits[key] = min(limits[key], getattr(settings, ceiling_of))
    return limits
