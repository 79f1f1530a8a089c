"""The training loop: reproducible, resumable mid-epoch with the same result, safe checkpoints."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from scvi_scale.config import TrainConfig
from scvi_scale.data import MemoryLoader, train_val_split
from scvi_scale.model import VAE, ModelConfig
from scvi_scale.train.checkpoint import CHECKPOINT_FORMAT, safe_load
from scvi_scale.train.loop import TrainingInterrupted, fit


def _data(n=300, g=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(rng.gamma(0.3, 4.0, size=(n, g))).astype(np.float32)
    x[:, 0] += 1
    return sp.csr_matrix(x), rng.integers(0, 2, n)


def _setup(cfg: TrainConfig, batch_size=32):
    x, b = _data()
    tr, va = train_val_split(x.shape[0], 0.9, 0, batch_size)
    torch.manual_seed(cfg.seed)
    model = VAE(x.shape[1], 2, ModelConfig(n_hidden=16, n_latent=4))
    return model, MemoryLoader(x, b, tr, batch_size, seed=cfg.seed), MemoryLoader(x, b, va, batch_size, shuffle=False)


CFG = TrainConfig(max_epochs=4, progress=False, n_epochs_kl_warmup=2)


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_same_seed_same_weights_different_seed_differs(tmp_path):
    runs = []
    for seed in (0, 0, 1):
        cfg = dataclasses.replace(CFG, seed=seed)
        model, tl, vl = _setup(cfg)
        fit(model, tl, vl, cfg, 2)
        runs.append(_weights(model))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert not all(torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_metrics_csv_and_kl_warmup(tmp_path):
    model, tl, vl = _setup(CFG)
    result = fit(model, tl, vl, CFG, 4, run_dir=tmp_path)
    m = pd.read_csv(tmp_path / "metrics.csv")
    assert list(m["epoch"]) == [0, 1, 2, 3] and result.global_step == 4 * len(tl)
    assert list(m["kl_weight"]) == [0.0, 0.5, 1.0, 1.0]
    # train/loss carries the warm-up weight, elbo does not: loss = rec + w * kl_z for an observed library
    np.testing.assert_allclose(
        m["train/loss"], m["train/reconstruction_loss"] + m["kl_weight"] * m["train/kl_local"], rtol=1e-5
    )
    np.testing.assert_allclose(m["train/elbo"], m["train/reconstruction_loss"] + m["train/kl_local"], rtol=1e-6)
    assert m["validation/elbo"].notna().all() and (m["perf/cells_per_s"] > 0).all()
    assert m["validation/elbo"].iloc[-1] < m["validation/elbo"].iloc[0]
    assert (tmp_path / "checkpoints" / "last.pt").is_file()


class _InterruptAt:
    """Wraps a loader and raises KeyboardInterrupt before minibatch `at` of epoch `epoch` (a user's Ctrl-C)."""

    def __init__(self, inner, epoch, at):
        self.inner, self.epoch_to_stop, self.at = inner, epoch, at

    def __len__(self):
        return len(self.inner)

    def set_epoch(self, e):
        self.inner.set_epoch(e)

    def state_dict(self, steps_done):
        return self.inner.state_dict(steps_done)

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)

    def __iter__(self):
        start = self.inner.start_step
        for i, b in enumerate(self.inner, start=start):
            if self.inner.epoch == self.epoch_to_stop and i == self.at:
                raise KeyboardInterrupt
            yield b


def test_interrupt_mid_epoch_then_resume_equals_uninterrupted(tmp_path):
    model, tl, vl = _setup(CFG)
    fit(model, tl, vl, CFG, 3, run_dir=tmp_path / "straight")
    straight = _weights(model)

    model, tl, vl = _setup(CFG)
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, _InterruptAt(tl, 1, 3), vl, CFG, 3, run_dir=tmp_path / "cut")
    assert "--resume" in str(info.value)
    ckpt = safe_load(info.value.checkpoint, CHECKPOINT_FORMAT)
    assert (ckpt["epoch"], ckpt["loader"]["step"]) == (1, 3)

    model, tl, vl = _setup(CFG)  # a fresh process would rebuild everything from scratch
    fit(model, tl, vl, CFG, 3, run_dir=tmp_path / "cut", resume_from=info.value.checkpoint)
    resumed = _weights(model)
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    a = pd.read_csv(tmp_path / "straight" / "metrics.csv")
    b = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    assert list(b["epoch"]) == [0, 1, 2]
    np.testing.assert_allclose(a["train/elbo"], b["train/elbo"], rtol=1e-6)


class _Crash(Exception):
    pass


class _CrashAt(_InterruptAt):
    """A hard failure (not Ctrl-C): the loop writes nothing, only the periodic checkpoints remain."""

    def __iter__(self):
        try:
            yield from super().__iter__()
        except KeyboardInterrupt:
            raise _Crash from None


def test_step_checkpoints_resume_after_a_crash(tmp_path):
    cfg = dataclasses.replace(CFG, checkpoint_every_n_steps=4)
    model, tl, vl = _setup(cfg)
    fit(model, tl, vl, cfg, 2, run_dir=tmp_path / "a")
    straight = _weights(model)
    assert len(tl) == 9  # 270 training cells / 32

    model, tl, vl = _setup(cfg)
    with pytest.raises(_Crash):
        fit(model, _CrashAt(tl, 1, 5), vl, cfg, 2, run_dir=tmp_path / "b")
    ckpt = safe_load(tmp_path / "b" / "checkpoints" / "last.pt", CHECKPOINT_FORMAT)
    # global steps 4 and 8 in epoch 0, then 12 = epoch 1 after 3 minibatches; the crash came at minibatch 5
    assert (ckpt["epoch"], ckpt["loader"]["step"], ckpt["global_step"]) == (1, 3, 12)
    model, tl, vl = _setup(cfg)
    fit(model, tl, vl, cfg, 2, run_dir=tmp_path / "b", resume_from=tmp_path / "b" / "checkpoints" / "last.pt")
    for k, v in straight.items():
        assert torch.equal(v, model.state_dict()[k]), k


def test_early_stopping_stops(tmp_path):
    cfg = dataclasses.replace(CFG, early_stopping=True, early_stopping_patience=1, early_stopping_min_delta=1e9)
    model, tl, vl = _setup(cfg)
    result = fit(model, tl, vl, cfg, 10, run_dir=tmp_path)
    # with an impossible min_delta the first check sets `best`, the second fails: stop after epoch 1
    assert result.stopped_early and result.epochs == 2


def test_checkpoint_is_weights_only_and_rejects_foreign_files(tmp_path):
    model, tl, vl = _setup(CFG)
    fit(model, tl, vl, CFG, 1, run_dir=tmp_path)
    path = tmp_path / "checkpoints" / "last.pt"
    obj = torch.load(path, weights_only=True)
    assert obj["format"] == CHECKPOINT_FORMAT and "optimizer" in obj and "torch_rng" in obj
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a scvi-scale-checkpoint"):
        safe_load(tmp_path / "other.pt", CHECKPOINT_FORMAT)
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a torch file")
    with pytest.raises(ValueError, match="not a readable"):
        safe_load(tmp_path / "garbage.pt", CHECKPOINT_FORMAT)


def test_losses_are_finite_on_sparse_data_with_empty_genes():
    x, b = _data()
    x = sp.hstack([x, sp.csr_matrix((x.shape[0], 3), dtype=np.float32)]).tocsr()  # three all-zero genes
    torch.manual_seed(0)
    model = VAE(x.shape[1], 2, ModelConfig(n_hidden=16, n_latent=4))
    loader = MemoryLoader(x, b, None, 64, seed=0)
    res = fit(model, loader, None, dataclasses.replace(CFG, max_epochs=1), 1)
    assert math.isfinite(res.history[-1]["train/elbo"])


class _InterruptValidation:
    """A validation loader that is interrupted (Ctrl-C) the first time it runs at epoch `epoch`."""

    def __init__(self, inner, train_loader, epoch):
        self.inner, self.train_loader, self.epoch, self.fired = inner, train_loader, epoch, False

    def __len__(self):
        return len(self.inner)

    def __iter__(self):
        if self.train_loader.epoch == self.epoch and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        yield from self.inner


def test_interrupt_during_validation_resumes_with_an_empty_rest_of_epoch(tmp_path):
    model, tl, vl = _setup(CFG)
    fit(model, tl, vl, CFG, 3, run_dir=tmp_path / "straight")
    straight = _weights(model)
    model, tl, vl = _setup(CFG)
    with pytest.raises(TrainingInterrupted) as info:
        fit(model, tl, _InterruptValidation(vl, tl, 1), CFG, 3, run_dir=tmp_path / "cut")
    ckpt = safe_load(info.value.checkpoint, CHECKPOINT_FORMAT)
    assert (ckpt["epoch"], ckpt["loader"]["step"]) == (1, len(tl))  # every batch of epoch 1 was done
    model, tl, vl = _setup(CFG)
    fit(model, tl, vl, CFG, 3, run_dir=tmp_path / "cut", resume_from=info.value.checkpoint)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in straight.items())
    m = pd.read_csv(tmp_path / "cut" / "metrics.csv")
    assert list(m["epoch"]) == [0, 1, 2] and m["kl_weight"].notna().all()
