"""A rebuild killed mid-way (SIGKILL at fault points, and mid-training) resumes on rerun and publishes once.

Each kill is a real one, of a ``scvi-scale rebuild`` subprocess: nothing runs after it, as on a node that dies.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scvi_scale import api
from scvi_scale.rebuild import rebuild
from scvi_scale.rebuild.run import FAULT_ENV, LEDGER
from scvi_scale.store.zarr_store import ZarrStore
from tests.rebuild.conftest import add_input, make_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _start(cfg_file: Path, fault: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    cmd = [sys.executable, "-m", "scvi_scale", "rebuild", "--config", str(cfg_file), "--no-progress"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _latest(runs: Path) -> str:
    return json.loads((runs / "latest").read_text())["version"]


def _check_previous(runs: Path) -> None:
    assert _latest(runs) == "v0001"
    api.load_run(runs / "versions" / "v0001")


def test_killed_rebuild_resumes(tmp_path: Path, atlas_parts: list[Path], caplog) -> None:
    cfg = make_config(tmp_path, warm_epochs=40)
    cfg_file = tmp_path / "atlas.yaml"
    cfg_file.write_text(json.dumps(cfg.to_dict()))
    runs = tmp_path / "runs"
    add_input(atlas_parts, 0, tmp_path / "incoming")
    assert rebuild(cfg).version == "v0001"
    n1 = ZarrStore(cfg.store).n_obs
    add_input(atlas_parts, 1, tmp_path / "incoming")

    # 1. killed right after the append committed, before the ledger recorded it
    proc = _start(cfg_file, "appended")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    meta = ZarrStore(cfg.store).metadata
    assert meta["complete"] and len(meta[LEDGER]) == 1
    n2 = ZarrStore(cfg.store).n_obs
    assert n2 > n1
    _check_previous(runs)

    # 2. killed mid-training, once the first checkpoint is on disk; latest stays readable meanwhile
    proc = _start(cfg_file)
    ckpt = runs / "work" / "a0002" / "run" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 240
    while proc.poll() is None and not ckpt.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    _check_previous(runs)
    proc.kill()
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL and ckpt.exists(), out
    assert not (runs / "work" / "a0002" / "run" / "model.pt").exists()
    _check_previous(runs)

    # 3. resumed: no second append, training from the checkpoint; killed after the version folder is in place
    proc = _start(cfg_file, "published-folder")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out
    assert "resuming attempt a0002" in out and "resuming training from" in out, out
    assert (runs / "versions" / "v0002" / "model.pt").is_file()
    _check_previous(runs)

    # 4. the last rerun only moves latest
    with caplog.at_level(logging.INFO, logger="scvi_scale.rebuild"):
        caplog.clear()
        result = rebuild(cfg)
    assert result.status == "published" and result.version == "v0002", result
    assert "resuming attempt a0002" in caplog.text and "ingested" not in caplog.text
    assert _latest(runs) == "v0002"
    store = ZarrStore(cfg.store)
    assert store.n_obs == n2 and len(store.metadata[LEDGER]) == 2
    run = api.load_run(runs / "versions" / "v0002")
    assert len(run.metrics) == 40  # every epoch once, across the kill
    assert rebuild(cfg).status == "nothing"
