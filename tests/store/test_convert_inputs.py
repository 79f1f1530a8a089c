"""Conversion of every input kind (10x mtx folders and .h5, AnnData .zarr) into Zarr, TileDB and URL outputs."""

from __future__ import annotations

import importlib.util
import re
import tempfile
import warnings
from pathlib import Path

import anndata
import fsspec
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zarr

from scvi_scale.store import InputError, open_store
from scvi_scale.store.convert import convert
from scvi_scale.store.inputs import open_input
from scvi_scale.store.zarr_store import ZarrStore
from tests.tenx import counts, write_10x_h5, write_mtx

BUDGET = 1024 * 48  # about 1,024 entries per block: many blocks even for tiny inputs
N_GENES = 12
IDS = [f"ENSG{i:04d}" for i in range(N_GENES)]
SYMBOLS = [f"G{i}" for i in range(N_GENES)]


def _barcodes(n: int, tag: str) -> list[str]:
    return [f"{tag}{i:04d}-1" for i in range(n)]


def _dense(store) -> np.ndarray:
    return store.read_range(0, store.n_obs).toarray()


def _by_gene(x: np.ndarray, genes: list[str], out: list[str]) -> np.ndarray:
    return pd.DataFrame(x, columns=genes).reindex(columns=out, fill_value=0).to_numpy()


def _write_zarr(adata: anndata.AnnData, path: Path, fmt: int) -> None:
    """``write_zarr`` as users call it; its own warnings (v2 going away, consolidated metadata in v3) are not ours."""
    with anndata.settings.override(zarr_write_format=fmt, auto_shard_zarr_v3=False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Writing zarr v2 data", UserWarning)
        warnings.filterwarnings("ignore", "Consolidated metadata", UserWarning)
        adata.write_zarr(path)


@pytest.fixture()
def tenx_inputs(tmp_path: Path) -> dict:
    """An mtx folder (with an antibody feature, dropped), a v3 .h5 and an AnnData .zarr with other gene sets."""
    x_a, x_b, x_c = counts(300, N_GENES + 1, 0), counts(200, 8, 1), counts(150, 6, 2)
    types = ["Gene Expression"] * N_GENES + ["Antibody Capture"]
    mtx = write_mtx(tmp_path / "s1", x_a, [*IDS, "CD3"], [*SYMBOLS, "CD3_TotalSeqB"], _barcodes(300, "A"), types=types)
    h5 = write_10x_h5(tmp_path / "s2.h5", x_b, IDS[4:], SYMBOLS[4:], _barcodes(200, "B"))
    genes_c = ["G4", "G5", "X1", "X2", "G11", "G0"]
    adata = anndata.AnnData(
        X=sp.csr_matrix(x_c.astype(np.float32)),
        obs=pd.DataFrame(index=_barcodes(150, "C")),
        var=pd.DataFrame(index=genes_c),
    )
    _write_zarr(adata, tmp_path / "s3.zarr", 3)
    return {
        "paths": [mtx, h5, tmp_path / "s3.zarr"],
        "x": [x_a[:, :N_GENES], x_b, x_c],
        "genes": [SYMBOLS, SYMBOLS[4:], genes_c],
        "obs_names": [_barcodes(300, "A"), _barcodes(200, "B"), _barcodes(150, "C")],
    }


@pytest.mark.parametrize(("gz", "shuffle"), [(True, False), (False, False), (True, True), (False, True)])
def test_mtx_folder_round_trip(tmp_path: Path, gz: bool, shuffle: bool, monkeypatch) -> None:
    x = counts(400, N_GENES, 3)
    x[7] = 0  # an empty barcode: dropped below, and a zero-entry run for the streaming and spilling paths
    folder = write_mtx(tmp_path / "10x", x, IDS, SYMBOLS, _barcodes(400, "A"), gz=gz, shuffle=shuffle)
    spill = tmp_path / "spill"
    spill.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spill))
    store = convert(folder, tmp_path / "out.zarr", memory_budget_bytes=BUDGET, progress=False, drop_empty_cells=True)
    keep = np.ones(400, dtype=bool)
    keep[7] = False
    np.testing.assert_array_equal(_dense(store), x[keep])
    assert list(store.var_names) == SYMBOLS
    assert list(store.obs.index) == list(np.asarray(_barcodes(400, "A"))[keep])
    assert list(spill.iterdir()) == []  # spilled row blocks are removed
    assert store.metadata["provenance"][0]["kind"] == "10x-mtx"


def test_mtx_file_with_geo_prefix_and_genes_tsv(tmp_path: Path) -> None:
    x = counts(50, N_GENES, 4)
    write_mtx(tmp_path / "geo", x, IDS, SYMBOLS, _barcodes(50, "A"), genes_tsv=True, prefix="GSM1_")
    store = convert(tmp_path / "geo" / "GSM1_matrix.mtx.gz", tmp_path / "out.zarr", progress=False)
    np.testing.assert_array_equal(_dense(store), x)


@pytest.mark.parametrize("v2", [False, True])
def test_10x_h5_round_trip(tmp_path: Path, v2: bool) -> None:
    x = counts(250, N_GENES + 1, 5)
    types = None if v2 else ["Gene Expression"] * 6 + ["Antibody Capture"] + ["Gene Expression"] * 6
    ids, names = IDS[:6] + ["AB"] + IDS[6:], SYMBOLS[:6] + ["AB"] + SYMBOLS[6:]
    path = write_10x_h5(tmp_path / "f.h5", x, ids, names, _barcodes(250, "A"), types=types, v2=v2)
    store = convert(path, tmp_path / "out.zarr", memory_budget_bytes=BUDGET, progress=False, var_names="gene_ids")
    kept = list(range(13)) if v2 else [*range(6), *range(7, 13)]
    np.testing.assert_array_equal(_dense(store), x[:, kept])
    assert list(store.var_names) == [ids[i] for i in kept]
    assert list(store.obs.index) == _barcodes(250, "A")


@pytest.mark.parametrize(("fmt", "dense"), [(2, False), (3, False), (3, True)])
def test_anndata_zarr_round_trip(tmp_path: Path, fmt: int, dense: bool) -> None:
    x = counts(120, N_GENES, 6).astype(np.float32)
    obs = pd.DataFrame({"batch": pd.Categorical(["a", "b"] * 60)}, index=_barcodes(120, "Z"))
    adata = anndata.AnnData(X=x if dense else sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=SYMBOLS))
    _write_zarr(adata, tmp_path / "in.zarr", fmt)
    store = convert(tmp_path / "in.zarr", tmp_path / "out.zarr", batch_key="batch", memory_budget_bytes=BUDGET,
                    progress=False)  # fmt: skip
    np.testing.assert_array_equal(_dense(store), x)
    assert list(store.obs.index) == _barcodes(120, "Z") and store.obs["batch"].tolist() == ["a", "b"] * 60
    again = convert(tmp_path / "out.zarr", tmp_path / "again.zarr", progress=False)  # our stores are inputs too
    np.testing.assert_array_equal(_dense(again), x)


@pytest.mark.parametrize("genes", ["union", "intersection"])
def test_mixed_kinds(tenx_inputs: dict, tmp_path: Path, genes: str) -> None:
    store = convert(tenx_inputs["paths"], tmp_path / "out.zarr", genes=genes, batch_per_file=True,
                    memory_budget_bytes=BUDGET, progress=False, drop_empty_cells=True)  # fmt: skip
    # union: order of first appearance; intersection: genes in every input, in the first input's order
    expected = [*SYMBOLS, "X1", "X2"] if genes == "union" else ["G4", "G5", "G11"]
    assert list(store.var_names) == expected
    want = np.vstack([_by_gene(x, g, expected) for x, g in zip(tenx_inputs["x"], tenx_inputs["genes"], strict=True)])
    keep = want.sum(axis=1) > 0  # cells with no counts in the selected genes are dropped
    assert keep.all() == (genes == "union")
    np.testing.assert_array_equal(_dense(store), want[keep])
    assert list(store.obs.index) == list(np.asarray(sum(tenx_inputs["obs_names"], []))[keep])
    assert store.obs["batch"].cat.categories.tolist() == ["s1", "s2", "s3"]
    assert [p["kind"] for p in store.metadata["provenance"]] == ["10x-mtx", "10x-h5", "anndata-zarr"]


def test_tiledb_round_trip_multi_file_union(tenx_inputs: dict, tmp_path: Path) -> None:
    pytest.importorskip("tiledb")
    store = convert(tenx_inputs["paths"], tmp_path / "out.tiledb", batch_per_file=True, memory_budget_bytes=BUDGET,
                    progress=False)  # fmt: skip
    reopened = open_store(tmp_path / "out.tiledb")
    expected = [*SYMBOLS, "X1", "X2"]
    assert list(reopened.var_names) == expected
    want = np.vstack([_by_gene(x, g, expected) for x, g in zip(tenx_inputs["x"], tenx_inputs["genes"], strict=True)])
    np.testing.assert_array_equal(_dense(reopened), want)
    assert list(reopened.obs.index) == sum(tenx_inputs["obs_names"], [])
    assert reopened.obs["batch"].tolist() == ["s1"] * 300 + ["s2"] * 200 + ["s3"] * 150
    prov = reopened.metadata["provenance"]
    assert prov["genes"] == "union" and prov["batch_key"] == "batch"
    assert [p["rows"] for p in prov["inputs"]] == [[0, 300], [300, 500], [500, 650]]
    assert reopened.metadata["count_dtype"] == "uint16" and store.n_obs == 650


def test_tiledb_format_flag_and_drop_empty(tmp_path: Path) -> None:
    pytest.importorskip("tiledb")
    x = counts(90, N_GENES, 7)
    x[[3, 50]] = 0
    folder = write_mtx(tmp_path / "10x", x, IDS, SYMBOLS, _barcodes(90, "A"), shuffle=True)
    with pytest.raises(InputError, match=r"matrix\.mtx\.gz: row 3 \('A0003-1'\) has zero total counts"):
        convert(folder, tmp_path / "out", store_format="tiledb", progress=False)
    convert(folder, tmp_path / "out", store_format="tiledb", drop_empty_cells=True, memory_budget_bytes=BUDGET,
            progress=False)  # fmt: skip
    from scvi_scale.store.tiledb_store import TileDBStore

    store = TileDBStore(tmp_path / "out")
    keep = np.ones(90, dtype=bool)
    keep[[3, 50]] = False
    np.testing.assert_array_equal(_dense(store), x[keep])
    assert list(store.obs.index) == list(np.asarray(_barcodes(90, "A"))[keep])


def test_shared_h5ad_to_tiledb(shared_data: Path, tmp_path: Path) -> None:
    pytest.importorskip("tiledb")
    src = shared_data / "ifnb_pbmc_ctrl_stim_1k.h5ad"
    convert(src, tmp_path / "ifnb.tiledb", batch_key="batch", memory_budget_bytes=8 << 20, progress=False)
    store = open_store(tmp_path / "ifnb.tiledb")
    ref = anndata.read_h5ad(src)
    assert (store.n_obs, store.n_vars) == ref.shape and list(store.var_names) == list(ref.var_names)
    assert (store.read_range(0, store.n_obs) != sp.csr_matrix(ref.X)).nnz == 0
    pd.testing.assert_series_equal(store.obs["batch"], ref.obs["batch"], check_names=False, check_index=False)


def test_url_output_in_place(tmp_path: Path) -> None:
    """A URL output (fsspec's memory:// here) is written in place; stale incomplete stores are replaced."""
    x = counts(60, N_GENES, 8)
    folder = write_mtx(tmp_path / "10x", x, IDS, SYMBOLS, _barcodes(60, "A"))
    url = f"memory://convert-test-{tmp_path.name}/x.zarr"
    store = convert(folder, url, progress=False)
    assert isinstance(store, ZarrStore)
    np.testing.assert_array_equal(_dense(open_store(url)), x)
    with pytest.raises(InputError, match="already exists; pass --overwrite"):
        convert(folder, url, progress=False)
    root = zarr.open_group(url, mode="r+")  # as if a conversion was killed after create_layout
    root.attrs["scvi_scale"] = {**root.attrs["scvi_scale"], "complete": False}
    with pytest.raises(InputError, match="incomplete"):
        ZarrStore(url)
    assert convert(folder, url, progress=False).n_obs == 60
    other = f"memory://convert-test-{tmp_path.name}/other"
    fsspec.filesystem("memory").pipe(f"{other.removeprefix('memory://')}/notes.txt", b"keep me")
    with pytest.raises(InputError, match="not a Zarr store; choose an empty location"):
        convert(folder, other, progress=False)


def _mtx_error(tmp_path: Path, **kwargs) -> str:
    folder = tmp_path / "bad"
    with pytest.raises(InputError) as err:
        convert(folder, tmp_path / "out.zarr", memory_budget_bytes=BUDGET, progress=False, **kwargs)
    assert not (tmp_path / "out.zarr").exists()
    return str(err.value)


@pytest.mark.parametrize(
    ("value", "what"), [(-2.0, r"a negative value \(-2\)"), (1.5, r"a non-integer value \(1\.5\)")]
)
def test_bad_count_in_mtx_names_file_row_and_gene(tmp_path: Path, value: float, what: str) -> None:
    x = counts(300, N_GENES, 9).astype(np.float64)
    x[217, 5] = value
    write_mtx(tmp_path / "bad", x, IDS, SYMBOLS, _barcodes(300, "A"), shuffle=True)
    message = _mtx_error(tmp_path)
    assert "\n" not in message
    assert re.search(rf"bad/matrix\.mtx\.gz: {what} at row 217 \('A0217-1'\), gene 'G5'", message)


def test_duplicated_symbols_suggest_gene_ids(tmp_path: Path) -> None:
    x = counts(40, N_GENES, 10)
    names = [*SYMBOLS[:-1], "G3"]
    write_mtx(tmp_path / "bad", x, IDS, names, _barcodes(40, "A"))
    message = _mtx_error(tmp_path)
    assert "features.tsv.gz: 1 gene symbols are duplicated ('G3')" in message
    assert "pass --var-names gene_ids" in message
    store = convert(tmp_path / "bad", tmp_path / "ids.zarr", var_names="gene_ids", progress=False)
    assert list(store.var_names) == IDS


def test_broken_mtx_folders(tmp_path: Path) -> None:
    x = counts(30, N_GENES, 11)
    write_mtx(tmp_path / "bad", x, IDS, SYMBOLS, _barcodes(30, "A"), gz=False)
    matrix = tmp_path / "bad" / "matrix.mtx"
    (tmp_path / "bad" / "barcodes.tsv").unlink()
    assert "bad: no barcodes.tsv.gz or barcodes.tsv next to matrix.mtx; a 10x folder holds" in _mtx_error(tmp_path)
    write_mtx(tmp_path / "bad", x, IDS, SYMBOLS, _barcodes(29, "A"), gz=False)
    assert "barcodes.tsv: 29 barcodes, but matrix.mtx has 30 columns (cells)" in _mtx_error(tmp_path)
    write_mtx(tmp_path / "bad", x, IDS, SYMBOLS, _barcodes(30, "A"), gz=False)
    lines = matrix.read_text().splitlines()
    matrix.write_text("\n".join([*lines[:5], f"{N_GENES + 1} 1 3", *lines[6:]]) + "\n")
    assert f"matrix.mtx: line 6: entry (gene {N_GENES + 1}, cell 1) lies outside the 12 x 30" in _mtx_error(tmp_path)
    matrix.write_text("\n".join(lines[:-3]) + "\n")
    assert "matrix.mtx: the header announces" in _mtx_error(tmp_path)
    matrix.write_text("\n".join([*lines[:5], "1 1 one", *lines[6:]]) + "\n")
    assert "matrix.mtx: cannot parse the entries after line 3" in _mtx_error(tmp_path)


def test_unknown_input_kind(tmp_path: Path) -> None:
    (tmp_path / "counts.csv").write_text("a,b\n1,2\n")
    with pytest.raises(InputError, match=r"counts\.csv: not an input scvi-scale converts; expected an \.h5ad file"):
        convert(tmp_path / "counts.csv", tmp_path / "out.zarr", progress=False)
    with pytest.raises(InputError, match="no such file or folder"):
        open_input(tmp_path / "missing.h5", max_entries=1024)


def test_batch_per_file_names_10x_outputs_by_sample_folder(tmp_path: Path) -> None:
    paths = []
    for i, name in enumerate(["donorA", "donorB"]):
        path = tmp_path / name / "outs" / "filtered_feature_bc_matrix.h5"
        path.parent.mkdir(parents=True)
        paths.append(write_10x_h5(path, counts(20, N_GENES, i), IDS, SYMBOLS, _barcodes(20, name)))
    store = convert(paths, tmp_path / "out.zarr", batch_per_file=True, progress=False)
    assert store.obs["batch"].tolist() == ["donorA"] * 20 + ["donorB"] * 20


def test_h5ad_to_s3_zarr(s3_bucket: str, tmp_path: Path) -> None:
    x = counts(70, N_GENES, 12).astype(np.float32)
    src = tmp_path / "a.h5ad"
    obs = pd.DataFrame({"batch": pd.Categorical(["p", "q"] * 35)}, index=_barcodes(70, "S"))
    anndata.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=SYMBOLS)).write_h5ad(src)
    url = f"{s3_bucket}/x.zarr"
    convert(src, url, batch_key="batch", memory_budget_bytes=BUDGET, progress=False)
    store = open_store(url)
    np.testing.assert_array_equal(_dense(store), x)
    assert list(store.obs.index) == _barcodes(70, "S") and store.metadata["complete"]
    if importlib.util.find_spec("tiledb") is not None:
        convert(src, f"{s3_bucket}/x.tiledb", batch_key="batch", progress=False)
        np.testing.assert_array_equal(_dense(open_store(f"{s3_bucket}/x.tiledb")), x)
