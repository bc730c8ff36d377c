"""M3: the event pipeline (placeholder until the worker's batched publisher lands)."""
from __future__ import annotations


def measure(bench, runs: int) -> list:
    return []
