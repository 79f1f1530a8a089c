"""Store metadata written by several processes at once: every writer's keys survive (no lost update)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import anndata
import pytest
import zarr

from scvi_scale.store.convert import convert
from scvi_scale.store.zarr_store import ZarrStore, set_complete

N_WRITERS = 4
N_UPDATES = 30


@pytest.fixture(scope="module")
def zarr_store(small_atlas: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("meta") / "small.zarr"
    convert([small_atlas], out, batch_key="batch", progress=False)
    return out


def _update_many(kind: str, path: str, rank: int, barrier: object) -> None:
    """One writer process: ``N_UPDATES`` metadata writes of its own keys, started together with the others."""
    if kind == "tiledb":
        from scvi_scale.store.tiledb_store import TileDBStore

        store: object = TileDBStore(path)
    else:
        store = ZarrStore(path)
    root = zarr.open_group(path, mode="r+") if kind == "set_complete" else None  # opened once: its attrs go stale
    barrier.wait()  # type: ignore[attr-defined]
    for i in range(N_UPDATES):
        if root is not None:
            set_complete(root, True, **{f"w{rank}_{i}": i})
        else:
            store.update_metadata(f"w{rank}_{i}", {"rank": rank, "i": i})  # type: ignore[attr-defined]


def _run_writers(kind: str, path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(N_WRITERS)
    procs = [ctx.Process(target=_update_many, args=(kind, str(path), rank, barrier)) for rank in range(N_WRITERS)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=240)
    assert [proc.exitcode for proc in procs] == [0] * N_WRITERS


def _expected_keys() -> set[str]:
    return {f"w{rank}_{i}" for rank in range(N_WRITERS) for i in range(N_UPDATES)}


@pytest.mark.parametrize("kind", ["update_metadata", "set_complete"])
def test_concurrent_zarr_metadata_writers_keep_every_key(zarr_store: Path, tmp_path: Path, kind: str) -> None:
    import shutil

    path = tmp_path / "store.zarr"
    shutil.copytree(zarr_store, path)
    _run_writers(kind, path)
    store = ZarrStore(path)  # still a valid, complete store, with the lock file in it
    meta = store.metadata
    missing = _expected_keys() - meta.keys()
    assert not missing, f"{len(missing)} of {N_WRITERS * N_UPDATES} keys lost, e.g. {sorted(missing)[:5]}"
    assert meta["complete"] is True and "provenance" in meta
    assert store.read_range(0, 5).shape == (5, store.n_vars)
    # the lock leaves nothing in the store for zarr's and anndata's listings to trip on (warnings are errors)
    assert sorted(p.name for p in path.iterdir()) == ["X", "obs", "obsm", "uns", "var", "zarr.json"]
    assert sorted(zarr.open_group(path, mode="r").group_keys()) == ["X", "obs", "obsm", "uns", "var"]
    assert anndata.read_zarr(path).shape == (store.n_obs, store.n_vars)


def test_concurrent_tiledb_metadata_writers_keep_every_key(tmp_path: Path) -> None:
    pytest.importorskip("tiledb")
    from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
    from scvi_scale.store.tiledb_store import TileDBStore

    path = tmp_path / "store.tiledb"
    TileDBStore.from_anndata(make_anndata(SyntheticSpec(n_cells=50, n_genes=20)), path)
    _run_writers("tiledb", path)
    store = TileDBStore(path)
    missing = _expected_keys() - store.metadata.keys()
    assert not missing, f"{len(missing)} of {N_WRITERS * N_UPDATES} keys lost, e.g. {sorted(missing)[:5]}"
    assert store.metadata["complete"] and store.read_range(0, 5).shape == (5, 20)


def test_tiledb_update_metadata_refreshes_other_writers_keys(tmp_path: Path) -> None:
    """An open store's ``metadata`` shows what another handle (another process) wrote once it writes itself."""
    pytest.importorskip("tiledb")
    from scvi_scale.datasets.synthetic import SyntheticSpec, make_anndata
    from scvi_scale.store.tiledb_store import TileDBStore

    path = tmp_path / "store.tiledb"
    TileDBStore.from_anndata(make_anndata(SyntheticSpec(n_cells=50, n_genes=20)), path)
    mine, other = TileDBStore(path), TileDBStore(path)
    other.update_metadata("theirs", {"a": 1})
    mine.update_metadata("ours", {"b": 2})
    assert mine.metadata["ours"] == {"b": 2} and "theirs" in mine.metadata
    mine.update_metadata("theirs", None)
    assert "theirs" not in mine.metadata and "theirs" not in TileDBStore(path).metadata
    assert TileDBStore(path).prepared is None and mine.metadata["provenance"] == other.metadata["provenance"]
