"""Shared by the data-parallel tests: a small Zarr store, and one process's training on the global minibatches."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from scvi_scale import api
from scvi_scale.config import Config, with_overrides
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


def reference_fit(store_path: Path, config: Config) -> dict[str, torch.Tensor]:
    """One process, plain batch norm, fed the concatenation of both ranks' minibatches, noise keyed by cell."""
    store = open_store(store_path)
    codes, cats = store.batch_codes(config.data.batch_key)
    dc, tc = config.data, config.train
    train_rows, _ = train_val_split(store.n_obs, dc.train_size, tc.seed, dc.batch_size)
    loaders = [
        StoreLoader(
            store,
            codes,
            train_rows,
            dc.batch_size,
            block_size=dc.block_size,
            buffer_blocks=dc.buffer_blocks,
            seed=tc.seed,
            rank=r,
            world_size=2,
            num_threads=1,
        )  # fmt: skip
        for r in range(2)
    ]
    torch.manual_seed(tc.seed)
    model = VAE(store.n_vars, len(cats), config.model)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    single = dataclasses.replace(tc, keyed_noise="on", workers=1, launcher="local", progress=False)
    fit(model, _GlobalBatches(loaders), None, single, tc.max_epochs)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    first = "z_encoder.encoder.fc_layers.Layer 0.0.weight"
    assert not torch.allclose(initial[first], trained[first], atol=1e-4)  # it trained: the comparisons mean something
    return trained


@pytest.fixture(scope="module")
def reference(store_path: Path) -> dict[str, torch.Tensor]:
    return reference_fit(store_path, with_overrides(None, **SECTIONS))


def assert_same_parameters(run_dir: Path, reference: dict[str, torch.Tensor]) -> None:
    got = api.load_run(run_dir).model.state_dict()
    assert got.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(got[key], value, rtol=2e-4, atol=2e-5, msg=key)
