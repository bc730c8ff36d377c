"""Figures: medians and p99s of repeated samples, the results table and bench/results.json."""
from __future__ import annotations

import json
import math
import platform
import os
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path


def percentile(samples: list[float], pct: float) -> float:
    """The nearest-rank percentile (p99 of fewer than 100 samples is their maximum)."""
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def summary(samples: list[float]) -> dict:
    """Median, p99, min, max and count of a list of samples."""
    if not samples:
        return {"n": 0}
    return {"n": len(samples), "median": statistics.median(samples), "p99": percentile(samples, 99),
            "min": min(samples), "max": max(samples)}


@dataclass
class Figure:
    """One row of the table: what we measured, its baseline in the same run, and the target it is held to."""

    id: str
    what: str
    unit: str
    ours: dict
    baseline: dict | None = None
    baseline_name: str = ""
    target: str = ""
    met: bool | None = None
    derived: dict = field(default_factory=dict)  # e.g. overhead = ours - baseline, ratios
    notes: str = ""

    def row(self) -> list[str]:
        base = self.baseline or {}
        ratio = (self.ours.get("median") / base["median"]) if base.get("median") and self.ours.get("median") else None
        verdict = {True: "yes", False: "NO", None: "-"}[self.met]
        extra = "; ".join(f"{k} {fmt(v)}" for k, v in self.derived.items())
        return [self.id, self.what, f"{fmt(self.ours.get('median'))} / {fmt(self.ours.get('p99'))} {self.unit}",
                f"{self.baseline_name}: {fmt(base.get('median'))} / {fmt(base.get('p99'))}" if base else "-",
                f"{ratio:.2f}x" if ratio else "-", extra, self.target, verdict]


def fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3f}"
    return str(value)


HEADER = ["id", "what", "ours: median / p99", "baseline: median / p99", "ratio", "derived", "target", "met"]


def table(figures: list[Figure]) -> str:
    """A Markdown table, the same in the terminal and in BENCHMARKS.md."""
    rows = [HEADER] + [f.row() for f in figures]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEADER))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def machine() -> dict:
    """What the figures were measured on."""
    mem_kb = next((int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")), 0)
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_gib": round(mem_kb / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


def write_results(path: Path, figures: list[Figure], context: dict) -> None:
    path.write_text(json.dumps({**context, "figures": [asdict(f) for f in figures]}, indent=2) + "\n")
