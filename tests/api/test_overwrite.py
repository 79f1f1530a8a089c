"""Training again into a run directory with overwrite starts a fresh run there."""

from __future__ import annotations

import pytest

import scvi_scale as ss
from scvi_scale.store.errors import InputError


def test_overwrite_replaces_the_earlier_runs_outputs(small_atlas, tmp_path) -> None:
    out = tmp_path / "run"
    common = {"data": {"batch_key": "batch"}, "model": {"n_hidden": 16, "n_latent": 4}}
    ss.train(small_atlas, out, train={"max_epochs": 3, "progress": False}, **common)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="--overwrite"):
        ss.train(small_atlas, out, train={"max_epochs": 2, "progress": False}, **common)
    run = ss.train(small_atlas, out, train={"max_epochs": 2, "progress": False}, overwrite=True, **common)
    assert list(run.metrics["epoch"]) == [0, 1]  # not the first run's three epochs followed by two more
    assert (out / "notes.txt").read_text() == "mine"  # files a run does not write are left alone
