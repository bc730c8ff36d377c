"""Fault-test figures: printed, and appended to .run/test-logs/faults.jsonl for RELIABILITY.md."""
from __future__ import annotations

import json
import time

from tests.stack import LOG_DIR


def report(name: str, figures: dict) -> None:
    print(f"\nFAULTS {name}: {json.dumps(figures)}")
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    with open(LOG_DIR / "faults.jsonl", "a", encoding="utf-8") as out:
        out.write(json.dumps({"test": name, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **figures}) + "\n")
