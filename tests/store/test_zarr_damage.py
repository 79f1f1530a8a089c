"""A damaged Zarr store (truncated, corrupted or missing chunk files) fails with one line, never wrong counts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from scvi_scale.store import InputError, read_h5ad
from scvi_scale.store.convert import convert
from scvi_scale.store.zarr_store import ZarrStore
from tests.cli.test_cli import cli


@pytest.fixture(scope="module")
def good_zarr(small_atlas: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("damage") / "good.zarr"
    convert([small_atlas], out, batch_key="batch", progress=False)
    return out


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(os.path.getsize(path) // 2)


def _scribble(path: Path) -> None:
    # overwrite bytes inside the first compressed chunk: the shard index stays valid, the zstd frame does not
    with open(path, "r+b") as fh:
        fh.seek(64)
        fh.write(b"\x00" * 32)


def _damaged_copy(good: Path, tmp_path: Path, array: str, damage: Callable[[Path], None]) -> Path:
    bad = tmp_path / "bad.zarr"
    shutil.copytree(good, bad)
    shard = sorted((bad / "X" / array / "c").iterdir())[0]
    damage(shard)
    return bad


@pytest.mark.parametrize("array", ["data", "indices"])
@pytest.mark.parametrize("damage", [_truncate, _scribble], ids=["truncated", "corrupted"])
def test_damaged_chunk_is_one_line_error(good_zarr: Path, tmp_path: Path, array: str, damage) -> None:
    bad = _damaged_copy(good_zarr, tmp_path, array, damage)
    store = ZarrStore(bad)
    with pytest.raises(InputError) as err:
        store.read_range(0, store.n_obs)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(bad) in msg and "shard file c/0" in msg and "damaged" in msg and "scvi-scale convert" in msg
    # scattered rows take the coordinate-selection path; it must fail the same way, not return zeros
    with pytest.raises(InputError, match="damaged"):
        store.read_rows(np.arange(0, store.n_obs, 7))
    if array == "data":  # row totals read only the counts
        with pytest.raises(InputError, match="damaged"):
            store.row_totals()


def test_missing_shard_file_is_refused_at_open(good_zarr: Path, tmp_path: Path) -> None:
    bad = _damaged_copy(good_zarr, tmp_path, "indices", os.remove)
    with pytest.raises(InputError, match=r"X/indices has 0 of its 1 shard files.*damaged"):
        ZarrStore(bad)


def test_undamaged_copy_reads_the_source(good_zarr: Path, small_atlas: Path, tmp_path: Path) -> None:
    # the control: copying alone damages nothing, so the failures above come from the damage
    copy = _damaged_copy(good_zarr, tmp_path, "data", lambda path: None)
    got = ZarrStore(copy).read_range(0, 50).toarray()
    np.testing.assert_array_equal(got, read_h5ad(small_atlas).X[:50].toarray())


def test_cli_train_on_damaged_store_exits_2(good_zarr: Path, tmp_path: Path) -> None:
    bad = _damaged_copy(good_zarr, tmp_path, "data", _scribble)
    proc = cli("train", bad, "--out", tmp_path / "run", "--set", "train.max_epochs=1", check=False)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "damaged" in last and "Traceback" not in proc.stderr
