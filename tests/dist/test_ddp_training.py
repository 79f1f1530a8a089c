"""Data-parallel training with real processes: 2 local workers, 2 torchrun ranks and 2 Ray Train workers each end
with the same parameters as one process fed the same global minibatches; resuming on fewer workers works."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from scvi_scale import api
from scvi_scale.config import with_overrides
from scvi_scale.data.batch import Batch
from scvi_scale.data.memory import train_val_split
from scvi_scale.data.prefetch import StoreLoader
from scvi_scale.model import VAE
from scvi_scale.store.convert import convert
from scvi_scale.store.open import open_store
from scvi_scale.train.loop import fit

SEED, BATCH, EPOCHS = 3, 32, 2
SECTIONS = {
    "data": {"batch_key": "batch", "batch_size": BATCH, "block_size": 16, "buffer_blocks": 4, "loader_threads": 1},
    "model": {"dropout_rate": 0.0},  # dropout masks come from each rank's own generator
    "train": {"max_epochs": EPOCHS, "progress": False, "seed": SEED, "num_threads": 1, "n_epochs_kl_warmup": 2},
}


@pytest.fixture(scope="module")
def store_path(small_atlas: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp") / "atlas.zarr"
    convert([small_atlas], out, batch_key="batch", progress=False)
    return out


class _GlobalBatches:
    """One process's view of a 2-rank epoch: at each step, rank 0's minibatch followed by rank 1's."""

    def __init__(self, loaders: list[StoreLoader]) -> None:
        self.loaders = loaders

    def __len__(self) -> int:
        return len(self.loaders[0])

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def __iter__(self):
        for parts in zip(*self.loaders, strict=True):
            sizes = {p.n_obs for p in parts}
            assert len(sizes) == 1, f"ranks got minibatches of sizes {sizes}; the comparison needs equal ones"
            offsets = np.cumsum([0] + [p.n_obs for p in parts])
            rows = torch.cat([p.nonzero[0] + int(o) for p, o in zip(parts, offsets, strict=False)])
            cols = torch.cat([p.nonzero[1] for p in parts])
            yield Batch(
                torch.cat([p.x_ng for p in parts]),
                torch.cat([p.batch_n for p in parts]),
                np.concatenate([p.rows_n for p in parts]),
                (rows, cols),
            )

    def state_dict(self, steps_done: int) -> dict:
        return self.loaders[0].state_dict(steps_done)

    def load_state_dict(self, state: dict) -> None:  # pragma: no cover - not resumed here
        raise NotImplementedError


@pytest.fixture(scope="module")
def reference(store_path: Path) -> dict[str, torch.Tensor]:
    """One process, plain batch norm, fed the concatenation of both ranks' minibatches, noise keyed by cell."""
    config = with_overrides(None, **SECTIONS)
    store = open_store(store_path)
    codes, cats = store.batch_codes("batch")
    train_rows, _ = train_val_split(store.n_obs, config.data.train_size, SEED, BATCH)
    dc = config.data
    loaders = [
        StoreLoader(
            store,
            codes,
            train_rows,
            BATCH,
            block_size=dc.block_size,
            buffer_blocks=dc.buffer_blocks,
            seed=SEED,
            rank=r,
            world_size=2,
            num_threads=1,
        )  # fmt: skip
        for r in range(2)
    ]
    torch.manual_seed(SEED)
    model = VAE(store.n_vars, len(cats), config.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fit(model, _GlobalBatches(loaders), None, dataclasses.replace(config.train, keyed_noise="on"), EPOCHS)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
    assert not torch.allclose(initial[first], trained[first], atol=1e-4)  # it trained: the comparisons mean something
    return trained


def _assert_same_parameters(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    got = api.load_run(run_dir).model.state_dict()
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=2e-4, atol=2e-5, msg=key)


@pytest.mark.timeout(300)
def test_local_launcher_two_workers(store_path: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "local"
    run = api.train(store_path, out, **{**SECTIONS, "train": {**SECTIONS["train"], "workers": 2}})
    _assert_same_parameters(out, reference)
    metrics = run.metrics
    assert list(metrics["world_size"]) == [2] * EPOCHS and len(metrics) == EPOCHS
    assert np.isfinite(metrics["validation/elbo"]).all()


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "scvi_scale", *args],
        capture_output=True, text=True, timeout=280, env=env,
    )  # fmt: skip


def _cli_overrides() -> list[str]:
    flat = []
    for section, values in SECTIONS.items():
        for key, value in values.items():
            flat += ["--set", f"{section}.{key}={str(value).lower() if isinstance(value, bool) else value}"]
    return flat


@pytest.mark.timeout(300)
def test_torchrun_two_ranks(store_path: Path, reference, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    proc = _torchrun("train", str(store_path), "--out", str(out), *_cli_overrides())
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_parameters(out, reference)
    assert proc.stdout.count("Run(") <= 1  # rank 0 alone prints the summary


@pytest.mark.timeout(300)
def test_torchrun_bad_input_is_one_line_on_every_rank(store_path: Path, tmp_path: Path) -> None:
    proc = _torchrun("train", str(store_path), "--out", str(tmp_path / "r"), "--batch-key", "nope")
    assert proc.returncode != 0
    assert "no obs column 'nope'" in proc.stderr


@pytest.mark.timeout(300)
def test_resume_two_workers_on_one(store_path: Path, tmp_path: Path) -> None:
    out = tmp_path / "resume"
    train = {**SECTIONS["train"], "workers": 2, "max_epochs": 1, "checkpoint_every_n_steps": 3}
    api.train(store_path, out, **{**SECTIONS, "train": train})
    run = api.train(store_path, None, resume=out, train={"max_epochs": 3, "workers": 1})
    assert run.fit_result.epochs == 3
    metrics = api.load_run(out).metrics
    assert list(metrics["epoch"]) == [0, 1, 2] and list(metrics["world_size"].fillna(1)) == [2, 1, 1]


def test_launcher_errors(store_path: Path, tmp_path: Path) -> None:
    from scvi_scale.store import InputError

    with pytest.raises(InputError, match="torchrun --nproc_per_node"):
        api.train(store_path, tmp_path / "a", train={"launcher": "torchrun"})
    import anndata

    with pytest.raises(InputError, match="pass a path or URL"):
        api.train(anndata.read_zarr(store_path), tmp_path / "b", train={"workers": 2})
