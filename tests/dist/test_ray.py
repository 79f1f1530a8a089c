"""Ray Train on a real local Ray instance: 2 workers equal one process on the global minibatches, and a worker
killed with SIGKILL mid-run costs a restart from the last checkpoint, not the run (same final parameters)."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from scvi_scale import api
from tests.dist.conftest import SECTIONS, assert_same_parameters, reference_fit

pytest.importorskip("ray.train", reason="the ray extra is not installed")
pytestmark = pytest.mark.slow

FAULT_EPOCHS = 40


@pytest.fixture(scope="module")
def ray_env():
    """Ray's test settings (no auth token file, no usage stats, quick health checks), restored afterwards."""
    settings = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    saved = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _ray_sections(epochs: int, **train: object) -> dict:
    return {**SECTIONS, "train": {**SECTIONS["train"], "workers": 2, "launcher": "ray", "max_epochs": epochs, **train}}


@pytest.mark.timeout(400)
def test_ray_two_workers_equal_one_process(ray_env, store_path: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "ray"
    run = api.train(
        store_path, out, **_ray_sections(SECTIONS["train"]["max_epochs"], storage_path=str(tmp_path / "rs"))
    )
    assert_same_parameters(out, reference)
    assert list(run.metrics["world_size"]) == [2, 2]
    # rank 0 reported each epoch's checkpoint to Ray's storage
    assert list((tmp_path / "rs").rglob("last.pt"))


def _ray_train_workers() -> list[int]:
    out = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines() if "ray::RayTrainWorker" in line]


@pytest.mark.timeout(500)
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_env, store_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "fault"
    killed: list[int] = []

    def kill_one_worker_mid_run() -> None:
        metrics, ckpt = out / "metrics.csv", out / "checkpoints" / "last.pt"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            rows = metrics.read_text().count("\n") - 1 if metrics.exists() else 0
            if ckpt.exists() and 3 <= rows < FAULT_EPOCHS // 2:
                workers = _ray_train_workers()
                if workers:
                    os.kill(workers[-1], signal.SIGKILL)
                    killed.append(rows)
                    return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_worker_mid_run, daemon=True)
    killer.start()
    run = api.train(store_path, out, **_ray_sections(FAULT_EPOCHS, checkpoint_every_n_steps=3, max_failures=1))
    killer.join(timeout=5)
    assert killed, "the test never found a Ray train worker to kill"
    # the loss curve continues from the checkpoint: every epoch once, in order, ELBO finite (a restart from
    # scratch would append epochs 0, 1, ... again to metrics.csv)
    metrics = run.metrics
    assert list(metrics["epoch"]) == list(range(FAULT_EPOCHS))
    assert metrics["train/elbo"].notna().all()
    # no cell repeated or skipped and the optimizer state restored: the same weights as an uninterrupted run
    config_train = dataclasses.replace(run.config.train, max_epochs=FAULT_EPOCHS)
    expected = reference_fit(store_path, dataclasses.replace(run.config, train=config_train))
    assert_same_parameters(out, expected)
    assert not torch.equal(expected["px_r"], torch.zeros_like(expected["px_r"]))
