"""The benchmark suite runs end to end (a --quick run of the cheaper figures) and its statistics are right."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench.stats import Figure, percentile, summary, table
from tests.stack import ROOT


def test_percentile_is_nearest_rank():
    samples = list(range(1, 201))  # 1..200
    assert percentile(samples, 50) == 100
    assert percentile(samples, 99) == 198
    assert percentile([5.0, 1.0, 3.0], 99) == 5.0
    assert summary([3.0, 1.0, 2.0])["median"] == 2.0


def test_table_shows_ratio_and_verdict():
    figure = Figure(id="MX", what="x", unit="ms", ours=summary([30.0, 40.0]), baseline=summary([10.0, 10.0]),
                    baseline_name="raw", target="t", met=False)
    row = table([figure]).splitlines()[2]
    assert "3.50x" in row and "NO" in row and "raw: 10.0" in row


@pytest.mark.docker
def test_quick_bench_run_writes_every_asked_figure(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "M2,M4", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    figures = {f["id"]: f for f in results["figures"]}
    assert set(figures) == {"M2", "M4-cold", "M4-warm"}
    for figure in figures.values():
        assert figure["ours"]["n"] > 0 and figure["ours"]["median"] > 0
        assert figure["baseline"]["median"] > 0  # each of these has its baseline, measured in the same run
    assert results["machine"]["cpus"] >= 1
    assert "| M2 " in proc.stdout  # the table is printed
