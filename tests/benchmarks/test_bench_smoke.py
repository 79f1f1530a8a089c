"""Smoke-run the benchmark scripts at their tiny ``--quick`` size: they run, and stdout is JSON lines only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_train_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line must be JSON
    assert all(r["bench"] == "train" for r in records)
    header = records[0]
    assert header.get("header") is True
    for key in ("torch", "scvi_tools", "cpu_model", "cpu_count", "threads"):
        assert key in header
    timed = [r for r in records if "impl" in r and "cells_per_s" in r]
    impls = {r["impl"] for r in timed}
    assert {"scvi-scale", "ceiling"} <= impls
    skipped = [r for r in records if r.get("impl") == "scvi-tools" and "skipped" in r]
    assert "scvi-tools" in impls or skipped, "scvi-tools neither measured nor reported as skipped"
    for r in timed:
        assert r["cells_per_s"] > 0 and r["seconds"] > 0
        assert {"batch_size", "n_cells", "n_genes", "threads"} <= r.keys()
    summaries = {(r["summary"], r["batch_size"]) for r in records if "summary" in r}
    for bs in (128, 1024):
        assert ("scvi_scale/ceiling", bs) in summaries
        assert ("scvi_scale/scvi_tools", bs) in summaries
    for r in records:
        if "summary" in r:
            assert {"ratio", "target", "met"} <= r.keys()


@pytest.mark.slow
def test_bench_loader_quick() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_loader.py"), "--quick", "--train"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # every line must be JSON
    assert all(r["bench"] == "loader" for r in records)
    assert records[0].get("header") is True and {"cpu_model", "cpu_count", "n_cells"} <= records[0].keys()
    timed = {r["impl"]: r for r in records if "cells_per_s" in r and "mode" not in r}
    expected = {"scvi-scale", "annbatch-emulation", "memory-loader-over-store", "anndata-backed", "memory-loader"}
    assert expected <= timed.keys()
    assert "scvi-tools" in timed or any(r.get("impl") == "scvi-tools" and "skipped" in r for r in records)
    for r in timed.values():
        assert r["cells_per_s"] > 0 and 0.5 < r["entropy_ratio"] <= 1.1
    assert "emulation" in timed["annbatch-emulation"]["note"]
    summaries = {r["summary"]: r for r in records if "summary" in r}
    assert {"scvi_scale/annbatch-emulation", "entropy_vs_iid", "train_store/train_memory"} <= summaries.keys()
    assert all({"ratio", "target", "met"} <= r.keys() for r in summaries.values())
    train = [r for r in records if r.get("mode") == "train"]
    assert len(train) == 2 and all(r["cells_per_s"] > 0 for r in train)
    assert "perf/read_s" in next(r for r in train if "StoreLoader" in r["impl"])
