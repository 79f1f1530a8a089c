"""Smoke-run ``benchmarks/bench_dist.py --quick`` and ``benchmarks/gpu_check.sh --cpu-dry-run`` at their tiny sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REAL_DATA = ROOT.parent / "shared" / "data"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_bench_dist_quick(tmp_path: Path) -> None:
    launchers = ["local", "ray"] if importlib.util.find_spec("ray") else ["local"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_dist.py"),
            "--quick",
            "--workdir",
            str(tmp_path),
            "--launchers",
            ",".join(launchers),
        ],  # fmt: skip
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]  # every line is JSON
    assert all(r["bench"] == "dist" for r in records) and records[0]["header"] is True
    parts: dict[str, list[dict]] = {}
    for r in records:
        parts.setdefault(r.get("part", "summary" if "summary" in r else "header"), []).append(r)
    bench_store = next(r for r in parts["store"] if r["store"] == "bench")
    assert bench_store["n_cells"] == 3000 and bench_store["raw_bytes_per_entry"] == 6
    assert 1.0 < bench_store["compression_ratio"] < 20.0
    if any(REAL_DATA.glob("*.h5ad")):
        real = [r for r in parts["store"] if r["store"] == "real"]
        assert real and all(r["nnz_per_cell"] > 0 and "hvg_nnz_per_cell" in r for r in real)
    (model,) = parts["model"]
    assert model["n_params"] > 0 and model["grad_bytes_fp32"] == 4 * model["n_params"]
    (ar,) = parts["allreduce"]
    assert ar["grad_ms"] > 0 and ar["bn_packet_ms"] > 0
    assert sorted(r["threads"] for r in parts["loader"]) == [1, 2]
    train = {(r["launcher"], r["workers"]): r for r in parts["train"]}
    assert train.keys() == {(launcher, w) for launcher in launchers for w in (1, 2)}
    for r in train.values():
        assert "error" not in r, r["error"]
        assert r["cells_per_s"] > 0 and r["world_size"] == r["workers"] and r["outside_epochs_s"] > 0
    summaries = {(r["summary"], r.get("launcher")) for r in parts["summary"]}
    assert {("scaling_efficiency", launcher) for launcher in launchers} <= summaries
    if "ray" in launchers:
        (bare,) = parts["ray_bare"]
        assert "error" not in bare, bare["error"]
        assert bare["init_s"] > 0 and bare["noop_fit_s"] > 0
        assert ("ray_overhead_s", None) in summaries


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_gpu_check_cpu_dry_run(tmp_path: Path) -> None:
    bash = shutil.which("bash")
    assert bash is not None
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    argv = [bash, str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-dry-run", "--workdir", str(tmp_path / "work")]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout)
    assert summary == json.loads((out / "gpu_check.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu" and summary["train_returncode"] == 0
    assert summary["store"]["n_cells"] == 4096 and summary["epochs_done"] == 2
    assert summary["cells_per_s"] > 0 and summary["met_cells_per_s"] is None
    assert (out / "metrics.csv").is_file()
    # a second run reuses the store it built
    again = subprocess.run(argv + ["--epochs", "1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=380)
    assert again.returncode == 0, again.stderr[-4000:]
    assert json.loads(again.stdout)["store"]["cached"] is True
