"""TileDB-SOMA experiments as conversion inputs: written with tiledbsoma's own writer, converted, compared exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale.store import InputError
from scvi_scale.store.convert import convert
from scvi_scale.store.inputs import open_input

tiledbsoma_io = pytest.importorskip("tiledbsoma.io", reason="the soma extra is not installed")

BUDGET = 16_384 * 48  # about 16k entries per block: 35 blocks of the 570k entries (each read costs ~15 ms)
DATA = "ifnb_pbmc_ctrl_stim_1k.h5ad"


def _write(adata: anndata.AnnData, path: Path, measurement: str = "RNA") -> Path:
    tiledbsoma_io.from_anndata(str(path), adata, measurement_name=measurement)
    return path


@pytest.fixture(scope="module")
def pbmc(tmp_path_factory, shared_data: Path) -> dict:
    """The IFN-beta PBMCs as an experiment: X "data" log-normalized, layer "counts" the raw counts, as is common."""
    adata = anndata.read_h5ad(shared_data / DATA)
    counts = sp.csr_matrix(adata.X)
    lib = np.asarray(counts.sum(axis=1)).ravel()
    norm = sp.csr_matrix(sp.diags(1e4 / lib) @ counts)
    norm.data = np.log1p(norm.data)
    adata.X, adata.layers["counts"] = norm.astype(np.float32), counts
    path = _write(adata, tmp_path_factory.mktemp("soma") / "pbmc.soma")
    return {"path": path, "counts": counts, "obs": adata.obs, "var_names": list(adata.var_names)}


@pytest.mark.parametrize("store_format", ["zarr", "tiledb"])
def test_round_trip_of_counts_obs_and_genes(pbmc: dict, tmp_path: Path, store_format: str) -> None:
    store = convert(
        pbmc["path"], tmp_path / f"out.{store_format}", batch_key="batch", memory_budget_bytes=BUDGET, progress=False
    )
    got = store.read_range(0, store.n_obs)
    assert (got != pbmc["counts"]).nnz == 0 and got.shape == pbmc["counts"].shape
    assert list(store.var_names) == pbmc["var_names"]
    assert list(store.obs.index) == list(pbmc["obs"].index)
    for col in ("batch", "cell_type"):
        assert store.obs[col].astype(str).tolist() == pbmc["obs"][col].astype(str).tolist()
    prov = store.metadata["provenance"]
    prov = prov["inputs"][0] if store_format == "tiledb" else prov[0]
    assert prov["kind"] == "tiledb-soma" and prov["key"] == "ms/RNA/X/counts"  # "counts" chosen over "data"


def test_blocks_are_bounded_and_cover_every_row(pbmc: dict) -> None:
    inp = open_input(pbmc["path"], max_entries=16_384)
    inp.scan()
    spans = [(a, b, blk.nnz) for a, b, blk in inp.blocks()]
    assert spans[0][0] == 0 and spans[-1][1] == inp.n_obs
    assert all(s[1] == t[0] for s, t in zip(spans, spans[1:], strict=False))
    assert len(spans) > 10 and all(nnz <= 16_384 or b - a == 1 for a, b, nnz in spans)
    assert sum(s[2] for s in spans) == pbmc["counts"].nnz == inp.nnz


def test_joinids_with_gaps_map_to_positions() -> None:
    from scvi_scale.store.soma_input import _positions

    ids = np.array([3, 4, 9, 12])
    np.testing.assert_array_equal(_positions(ids, np.array([12, 3, 9, 9]), "obs", "x"), [3, 0, 2, 2])
    np.testing.assert_array_equal(_positions(np.arange(5, 9), np.array([8, 5]), "obs", "x"), [3, 0])
    with pytest.raises(InputError, match="obs soma_joinid 10, which is not in obs"):
        _positions(ids, np.array([4, 10]), "obs", "x")


def test_layer_choice_and_bad_layer(pbmc: dict, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"non-integer"):  # X "data" is log-normalized: not counts
        convert(pbmc["path"], tmp_path / "x.zarr", layer="data", progress=False)
    with pytest.raises(InputError, match=r"no X layer 'raw'; its layers: \['counts', 'data'\]"):
        open_input(pbmc["path"], max_entries=1024, layer="raw")


def test_measurement_choice_and_gene_ids(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = sp.random(40, 7, density=0.5, format="csr", random_state=rng, dtype=np.float32)
    x.data = np.ceil(x.data * 20)
    x[np.asarray(x.sum(axis=1)).ravel() == 0, 0] = 1
    var = pd.DataFrame({"feature_id": [f"ENSG{i}" for i in range(7)]}, index=[f"G{i}" for i in range(7)])
    adata = anndata.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]), var=var)
    path = _write(adata, tmp_path / "atac.soma", measurement="GEX")
    with pytest.raises(InputError, match=r"no measurement 'RNA'; its measurements: \['GEX'\]"):
        open_input(path, max_entries=1024)
    store = convert(f"{path}#GEX", tmp_path / "out.zarr", var_names="gene_ids", progress=False)
    np.testing.assert_array_equal(store.read_range(0, 40).toarray(), x.toarray())
    assert list(store.var_names) == list(var["feature_id"])
    assert open_input(f"{path}#GEX", max_entries=1024).var_names.tolist() == list(adata.var_names)  # the index
    with pytest.raises(InputError, match=r"no measurement 'ADT'; its measurements: \['GEX'\]"):
        open_input(f"{path}#ADT", max_entries=1024)


def test_missing_tiledbsoma_names_the_extra(pbmc: dict, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "tiledbsoma", None)  # import fails as if not installed
    with pytest.raises(InputError, match=r"pip install 'scvi-scale\[soma\]'"):
        open_input(pbmc["path"], max_entries=1024)


def test_experiment_in_object_storage(pbmc: dict, s3_bucket: str, s3_env: str, tmp_path: Path) -> None:
    from tests.s3 import upload_tree

    url = upload_tree(pbmc["path"], f"{s3_bucket}/pbmc.soma", s3_env)
    store = convert(url, tmp_path / "out.zarr", memory_budget_bytes=BUDGET * 4, progress=False)
    assert (store.read_range(0, store.n_obs) != pbmc["counts"]).nnz == 0
    assert store.metadata["provenance"][0]["path"] == url
    with pytest.raises(InputError, match=r"s3://.*TileDB-SOMA experiment"):
        open_input(f"{s3_bucket}/nothing.soma", max_entries=1024)
