"""Smoke-run ``benchmarks/bench_store.py --quick``: every part runs and stdout is JSON lines only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_store_quick(tmp_path: Path) -> None:
    pytest.importorskip("tiledb")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_store.py"), "--quick", "--workdir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]
    assert records[0]["header"] is True and records[-1]["done"] is True
    reads = {r["store"]: r for r in records if r.get("part") == "reads" and "store" in r}
    assert {"zarr", "tiledb", "h5ad-backed"} <= reads.keys()
    # every store read the same blocks, so the same entries
    assert len({r["nnz_read"] for r in reads.values()}) == 1
    convert = [r for r in records if r.get("part") == "convert"]
    assert {r["impl"] for r in convert} == {"ours", "anndata-read-write-zarr"}
    for r in convert:
        assert r["peak_rss"] >= r["baseline_rss"] > 0 and r["cells_per_s"] > 0
    chunks = [r for r in records if r.get("part") == "chunks"]
    assert {r["entry_chunk"] for r in chunks} == {16384, 65536} and any(r["default"] for r in chunks)
    summaries = {r["summary"] for r in records if "summary" in r}
    assert {"zarr/h5ad-backed", "tiledb/h5ad-backed"} <= summaries
