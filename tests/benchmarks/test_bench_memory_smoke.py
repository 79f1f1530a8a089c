"""Smoke-run the memory, loader-quality and S3-loader benchmarks at their tiny ``--quick`` size."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # every line must be JSON


@pytest.mark.slow
def test_bench_memory_quick(tmp_path: Path) -> None:
    records = _run("bench_memory.py", "--quick", "--workdir", str(tmp_path))
    assert all(r["bench"] == "memory" for r in records) and records[0]["header"] is True
    for label in ("small", "large"):
        parts = {r["part"]: r for r in records if r.get("store") == label}
        assert parts.keys() == {"build", "setup", "train"}
        train = parts["train"]
        assert train["peak_rss"] >= train["baseline_rss"] > 0 and train["steps"] > 0
        assert parts["setup"]["indptr_bytes"] == 8 * (parts["build"]["n_cells"] + 1)
    summaries = {r["summary"]: r for r in records if "summary" in r}
    assert summaries.keys() == {"peak_large/peak_small", "peak_large_bytes"}
    assert all({"ratio", "target", "met"} <= r.keys() for r in summaries.values())
    # the stores are cached by spec: building the same one again reuses it
    small = next(r for r in records if r.get("part") == "build" and r["store"] == "small")
    argv = ["--child", "build", "--n-cells", str(small["n_cells"]), "--n-genes", str(small["n_genes"])]
    again = _run("bench_memory.py", *argv, "--workdir", str(tmp_path))
    assert again[-1]["cached"] is True and again[-1]["path"] == small["path"]


@pytest.mark.slow
def test_bench_loader_quality_quick(tmp_path: Path) -> None:
    records = _run("bench_loader_quality.py", "--quick", "--workdir", str(tmp_path))
    assert all(r["bench"] == "loader_quality" for r in records)
    assert records[0]["header"] is True and records[-1]["done"] is True
    runs = {r["run"]: r for r in records if "run" in r}
    assert runs.keys() == {"memory", "block", "block-small", "memory-seed+1"}
    for r in runs.values():
        assert r["n_val"] > 0 and r["elbo"] > 0 and r["epochs"] == 2
    assert runs["block-small"]["buffers_per_epoch"] > 1  # the stress case really cuts the epoch into buffers
    summaries = {r["summary"]: r for r in records if "summary" in r}
    assert summaries.keys() == {"block/memory", "block-small/memory", "memory-seed+1/memory"}
    assert all({"rel_diff", "ratio", "target", "met"} <= r.keys() for r in summaries.values())


@pytest.mark.slow
def test_bench_loader_s3_quick(tmp_path: Path) -> None:
    for module in ("moto", "obstore", "s3fs"):
        pytest.importorskip(module)
    records = _run("bench_loader_s3.py", "--quick", "--workdir", str(tmp_path))
    assert all(r["bench"] == "loader_s3" for r in records) and records[0]["header"] is True
    timed = {r["store"]: r for r in records if "store" in r}
    assert timed.keys() == {"local", "s3-obstore", "s3-fsspec"}
    assert all(r["cells_per_s"] > 0 and r["epoch_cells"] == [records[0]["n_train"]] for r in timed.values())
    summaries = {r["summary"] for r in records if "summary" in r}
    assert summaries == {"s3-obstore/local", "s3-fsspec/local"}
