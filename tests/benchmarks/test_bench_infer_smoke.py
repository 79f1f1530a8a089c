"""Smoke-run ``benchmarks/bench_infer.py --quick``: every configuration runs and stdout is JSON lines only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_infer_quick(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_infer.py"), "--quick", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # every line must be JSON
    assert all(r["bench"] == "infer" for r in records)
    assert records[0]["header"] is True and records[-1]["done"] is True
    timed = {r["impl"]: r for r in records if "impl" in r}
    assert set(timed) == {"loader-only", "model-only", "embed-and-write", "normalize-and-write"}
    for r in timed.values():
        assert r["cells_per_s"] > 0 and r["seconds"] > 0
    assert timed["embed-and-write"]["cells"] == timed["loader-only"]["cells"] == 4000
    (summary,) = [r for r in records if "summary" in r]
    assert summary["summary"] == "embed_write/loader_only" and summary["target"] == 0.8
    assert 0 < summary["ratio"] and 0 < summary["ceiling_if_serial"] < 1
