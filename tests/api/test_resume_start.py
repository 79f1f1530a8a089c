"""A run that began from another run's weights with some rows held out resumes the same way, from its
checkpoint alone (``ss.resume``, or the command the interrupt message prints)."""

from __future__ import annotations

import numpy as np

import scvi_scale as ss


def test_resume_keeps_the_warm_start_and_the_held_out_rows(small_atlas, tmp_path) -> None:
    common = {"data": {"batch_key": "batch"}, "model": {"n_hidden": 16, "n_latent": 4}}
    base = ss.train(small_atlas, tmp_path / "base", train={"max_epochs": 2, "progress": False}, **common)
    held = np.arange(0, 600, 7)
    ss.train(small_atlas, tmp_path / "next", train={"max_epochs": 2, "progress": False}, init_from=base.path,
             exclude_rows=held, **common)  # fmt: skip
    resumed = ss.train(None, None, resume=tmp_path / "next", train={"max_epochs": 4, "progress": False})
    split = np.load(tmp_path / "next" / "split.npz")
    assert not np.intersect1d(np.concatenate([split["train"], split["validation"]]), held).size
    assert list(resumed.metrics["epoch"]) == [0, 1, 2, 3]
