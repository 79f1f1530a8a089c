"""Ctrl-C during training (SIGINT, as a terminal or a notebook's stop button sends it), mid-epoch: a checkpoint
is left, the message says how to resume, and resuming gives the run an uninterrupted one would have."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

import scvi_scale as ss
from scvi_scale import cli
from scvi_scale.train.checkpoint import CHECKPOINT_FORMAT, safe_load

EPOCHS = 3
N_CELLS = 1000
STEPS = int(N_CELLS * 0.9) // 16  # (at least) the steps of an epoch
SECTIONS = {  # ~60 small steps an epoch; step checkpoints tell the test where training is
    "data": {"batch_key": "batch", "batch_size": 16},
    "train": {"max_epochs": EPOCHS, "seed": 1, "num_threads": 1, "progress": False, "checkpoint_every_n_steps": 3},
}
SCRIPT = """
import sys
import scvi_scale as ss
ss.train(sys.argv[1], sys.argv[2], **{sections!r})
"""


@pytest.fixture(scope="module")
def atlas(tmp_path_factory) -> Path:
    from scvi_scale.datasets.synthetic import SyntheticSpec, write_h5ad

    path = tmp_path_factory.mktemp("interrupt") / "atlas.h5ad"
    return write_h5ad(SyntheticSpec(n_cells=N_CELLS, n_genes=300, n_batches=2, n_cell_types=3, seed=2), path)


def _wait_mid_epoch(ckpt: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Wait until a step checkpoint shows training in the first part of an epoch after the first one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            state = safe_load(ckpt, CHECKPOINT_FORMAT)  # written atomically: whole or not there
        except (FileNotFoundError, ValueError):
            state = None
        if state is not None and state["epoch"] >= 1 and 0 < state["loader"]["step"] <= STEPS // 2:
            return
        time.sleep(0.01)
    raise AssertionError("training never reached the middle of an epoch")


@pytest.mark.timeout(300)
def test_sigint_mid_epoch_leaves_a_checkpoint_that_resumes(tmp_path: Path, atlas: Path):
    run_dir = tmp_path / "run"
    script = SCRIPT.format(sections=SECTIONS)
    proc = subprocess.Popen([sys.executable, "-c", script, str(atlas), str(run_dir)], stderr=subprocess.PIPE, text=True)
    try:
        _wait_mid_epoch(run_dir / "checkpoints" / "last.pt", proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err

    ckpt = safe_load(run_dir / "checkpoints" / "last.pt", CHECKPOINT_FORMAT)
    epoch, step = ckpt["epoch"], ckpt["loader"]["step"]
    assert 1 <= epoch < EPOCHS and 0 < step < STEPS  # mid-epoch (at a step boundary)
    assert list(pd.read_csv(run_dir / "metrics.csv")["epoch"]) == list(range(epoch))
    # the message says what happened and what to run, in Python and on the command line
    done = f"{epoch} full epoch{'' if epoch == 1 else 's'} and {step} of the next epoch's"
    assert f"TrainingInterrupted: training interrupted after {done}" in err
    assert f"ss.train({str(atlas)!r}, {str(run_dir)!r}, resume={str(run_dir)!r})" in err
    assert f"scvi-scale train {atlas} --out {run_dir} --resume {run_dir}" in err

    resumed = ss.train(atlas, run_dir, resume=run_dir)  # what the message says
    assert list(resumed.metrics["epoch"]) == list(range(EPOCHS))
    straight = ss.train(atlas, tmp_path / "straight", **SECTIONS)
    for key, value in straight.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_the_cli_says_how_to_resume_and_exits_130(monkeypatch, capsys, tmp_path: Path):
    def interrupted(*args, **kwargs):
        ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
        raise ss.TrainingInterrupted(ckpt, 2, 5, 40).with_hint(ss.api._resume_hint("atlas.zarr", ckpt))

    monkeypatch.setattr(ss.api, "train", interrupted)
    assert cli.main(["train", "atlas.zarr", "--out", str(tmp_path / "run"), "--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "after 2 full epochs and 5 of the next epoch's 40 steps" in err
    assert f"scvi-scale train atlas.zarr --out {tmp_path / 'run'} --resume {tmp_path / 'run'}" in err
