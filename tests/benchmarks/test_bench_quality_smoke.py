"""Smoke-run ``benchmarks/bench_quality.py --quick``: it runs, stdout is JSON lines, both sides are scored."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.parity
def test_bench_quality_quick(tmp_path) -> None:
    pytest.importorskip("scvi")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_quality.py"),
            "--quick",
            "--metrics",
            "own",
            "--n-mc-samples",
            "10",
            "--workdir",
            str(tmp_path),
        ],  # fmt: skip
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # JSON lines only
    assert records[0]["header"] is True
    (rec,) = records[1:]
    assert rec["dataset"] == "synthetic" and rec["heldout_cells"] == 60
    for key in ("neg_elbo_ours", "neg_elbo_peer", "elbo_ratio", "scib_total_ours", "scib_total_peer", "scib_ratio"):
        assert math.isfinite(rec[key]), key
    assert rec["elbo_met"] == (rec["elbo_ratio"] <= 1.005) and rec["scib_met"] == (rec["scib_ratio"] >= 1.0)
    assert rec["scib_metrics"] is False
