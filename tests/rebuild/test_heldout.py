"""The held-out set: a stable hash of the cell id, the same cells as the atlas grows, never trained on."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from scvi_scale import api
from scvi_scale.rebuild.heldout import cell_hashes, eval_rows, heldout_mask


def test_hash_is_pinned_and_uniform() -> None:
    # blake2b-64 of the id: the same on every machine and Python; a change here would move held-out cells
    assert cell_hashes(np.array(["cell_0000001"]))[0] == 0.030296073243374626
    h = cell_hashes(np.array([f"c{i}" for i in range(20_000)]))
    assert abs((h < 0.1).mean() - 0.1) < 0.01


class _Store:
    def __init__(self, names: list[str]) -> None:
        self.obs, self.source = pd.DataFrame(index=names), "mem"


def test_same_cells_as_the_atlas_grows(tmp_path: Path) -> None:
    names = [f"cell_{i}" for i in range(3000)]
    small, hs = heldout_mask(_Store(names[:1000]), 0.1, None, None)
    big, hb = heldout_mask(_Store(names), 0.1, None, None)
    assert np.array_equal(big[:1000], small) and np.array_equal(hb[:1000], hs)
    # the evaluation set of the small atlas is rebuilt exactly from the big one (capped by lowest hash)
    assert np.array_equal(eval_rows(small, hs, 1000, 40), eval_rows(big, hb, 1000, 40))
    assert eval_rows(big, hb, 3000, 40).size == 40
    file = tmp_path / "ids.txt"
    file.write_text("cell_2999\ncell_5\n")
    listed, _ = heldout_mask(_Store(names), 0.1, str(file), None)
    others = ~np.isin(np.arange(3000), [5, 2999])
    assert listed[2999] and listed[5] and np.array_equal(listed & others, big & others)


def test_train_excludes_rows(tmp_path: Path, small_atlas: Path) -> None:
    exclude = np.arange(0, 600, 7)
    api.train(small_atlas, tmp_path / "run", exclude_rows=exclude, train={"max_epochs": 1, "progress": False},
              model={"n_hidden": 16, "n_latent": 4})  # fmt: skip
    with np.load(tmp_path / "run" / "split.npz") as split:
        seen = np.concatenate([split["train"], split["validation"]])
    assert not np.intersect1d(seen, exclude).size and seen.size + exclude.size == 600
