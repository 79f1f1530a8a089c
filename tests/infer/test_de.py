"""Differential expression: agreement with scvi-tools 1.4.2's ``differential_expression`` on the same weights and
cells (ifnb, STIM vs CTRL within CD14 monocytes) within Monte Carlo error, from a Zarr store reading only the
two groups' cells; the math pieces against scvi-tools' own functions; one-line errors for bad groups.

Tolerances come from the sampling error of each side's estimate: ``n_samples_overall = 5000`` draws kept out of a
pool of ``S * n_cells ~ 5000`` decoded rows, so an estimated probability ``p`` has variance at most ~``2 p (1 - p) /
5000`` (pool and resampling) and a mean LFC ~``2 lfc_std**2 / 5000``; the difference of two independent estimates
twice that. With that bound, ``z`` of the differences measured max |z| 1.5-2.4 over seeds 0-2 (the bound is
conservative); the test asks max |z| < 4.5 (one gene: p ~ 7e-6; 1,000 genes: below 1 %, by the union bound, however
correlated). The genes share their draws, so their errors are correlated (seed 0 shifts many LFCs by ~2 SE
together): an average over genes is not an average of independent errors and is not tested against 1. Seeds are
fixed on both sides (the draws differ anyway: scvi-tools decodes every cell, we only those kept).
"""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest

from scvi_scale import analysis, api
from scvi_scale.infer import de
from scvi_scale.store.convert import convert
from scvi_scale.store.errors import InputError

N = 5000
CELL_TYPE = "CD14 Mono"


@pytest.fixture(scope="module")
def ifnb(shared_data: Path, tmp_path_factory) -> tuple[anndata.AnnData, Path]:
    """ifnb with its 1,000 most-counted genes, as an AnnData and as a Zarr store."""
    adata = anndata.read_h5ad(shared_data / "ifnb_pbmc_ctrl_stim_1k.h5ad")
    top = np.sort(np.argsort(-np.asarray(adata.X.sum(axis=0)).ravel())[:1000])
    adata = adata[:, top].copy()
    root = tmp_path_factory.mktemp("de")
    adata.write_h5ad(root / "ifnb1000.h5ad")
    store = convert([root / "ifnb1000.h5ad"], root / "ifnb.zarr", batch_key="batch", progress=False)
    return adata, Path(store.source)


@pytest.fixture(scope="module")
def run(ifnb, tmp_path_factory) -> api.Run:
    train = {"data": {"batch_key": "batch", "batch_size": 128}, "model": {"n_latent": 10},
             "train": {"max_epochs": 30, "progress": False, "num_threads": 1}}  # fmt: skip
    return api.train(ifnb[0], tmp_path_factory.mktemp("de-run") / "run", **train)


@pytest.fixture(scope="module")
def scvi_model(run, ifnb, tmp_path_factory):
    scvi = pytest.importorskip("scvi")
    path = api.export_scvi_tools(run, tmp_path_factory.mktemp("de-st") / "scvi")
    return scvi.model.SCVI.load(str(path), adata=ifnb[0].copy())


def _theirs(model, mode: str, batch_correction: bool) -> pd.DataFrame:
    import scvi

    obs = model.adata.obs
    in_type = (obs["cell_type"] == CELL_TYPE).to_numpy()
    scvi.settings.seed = 0  # torch and numpy
    return model.differential_expression(
        idx1=in_type & (obs["batch"] == "STIM").to_numpy(), idx2=in_type & (obs["batch"] == "CTRL").to_numpy(),
        mode=mode, batch_correction=batch_correction, silent=True,
    )  # fmt: skip


def _z(ours: pd.Series, theirs: pd.Series, var_each: np.ndarray) -> np.ndarray:
    return ((ours - theirs) / np.sqrt(2 * var_each)).to_numpy()


@pytest.mark.slow
@pytest.mark.parity
@pytest.mark.filterwarnings("ignore::UserWarning:scvi.*")
@pytest.mark.parametrize(("mode", "batch_correction"), [("vanilla", False), ("change", False), ("change", True)])
def test_agrees_with_scvi_tools_within_monte_carlo_error(run, ifnb, scvi_model, mode, batch_correction):
    ours = analysis.differential_expression(
        run, ifnb[1], "batch", "STIM", "CTRL", subset={"cell_type": CELL_TYPE}, mode=mode,
        batch_correction=batch_correction, seed=0,
    )  # fmt: skip
    theirs = _theirs(scvi_model, mode, batch_correction)
    assert list(theirs.columns) == [c for c in ours.columns if c not in ("comparison", "group1", "group2")]
    assert (ours["comparison"] == "STIM vs CTRL").all() and list(ours.index) != list(theirs.index.sort_values())
    theirs = theirs.loc[ours.index]
    stats = ["raw_mean1", "raw_mean2", "non_zeros_proportion1", "non_zeros_proportion2", "raw_normalized_mean1",
             "raw_normalized_mean2"]  # fmt: skip
    np.testing.assert_allclose(ours[stats].to_numpy(float), theirs[stats].to_numpy(float), rtol=1e-4, atol=1e-8)
    for col in ("scale1", "scale2"):
        assert np.corrcoef(np.log(ours[col]), np.log(theirs[col]))[0, 1] > 0.999
    proba = "proba_m1" if mode == "vanilla" else "proba_de"
    p = ((ours[proba] + theirs[proba]) / 2).clip(1 / N, 1 - 1 / N)
    z = _z(ours[proba], theirs[proba], 2 * p * (1 - p) / N)
    assert np.abs(z).max() < 4.5, ours.index[np.argmax(np.abs(z))]
    if mode == "change":
        assert ours["delta"].iloc[0] == theirs["delta"].iloc[0] == 0.25
        assert ours["pseudocounts"].iloc[0] == pytest.approx(theirs["pseudocounts"].iloc[0], rel=0.5)
        std = (ours["lfc_std"] + theirs["lfc_std"]) / 2
        z = _z(ours["lfc_mean"], theirs["lfc_mean"], 2 * std**2 / N)
        assert np.abs(z).max() < 4.5, ours.index[np.argmax(np.abs(z))]
        np.testing.assert_allclose(ours["lfc_std"], theirs["lfc_std"], rtol=0.1)
        # genes whose mean LFC clears our 21st by more than 5 standard errors must be in scvi-tools' top 20
        order = ours["lfc_mean"].sort_values(ascending=False)
        se = np.sqrt(4 * std**2 / N)
        sure = order.index[:20][(order.iloc[:20] - order.iloc[20]).to_numpy() > 5 * se[order.index[:20]].to_numpy()]
        assert len(sure) >= 5 and set(sure) <= set(theirs["lfc_mean"].nlargest(20).index)
        isgs = {"MX1", "IFIT1", "IFIT2", "IFIT3", "IRF7", "ISG15", "IFI6", "OAS1", "RSAD2", "IFI44L"}
        assert len(isgs & set(order.index[:20])) >= 3  # the interferon response leads
        flag = "is_de_fdr_0.05"
        assert ours[flag].dtype == bool and abs(int(ours[flag].sum()) - int(theirs[flag].sum())) <= 0.05 * len(ours)


def test_math_matches_scvi_tools_functions():
    pytest.importorskip("scvi")
    from scvi.model.base._de_core import _fdr_de_prediction
    from scvi.model.base._differential import credible_intervals, estimate_pseudocounts_offset

    rng = np.random.default_rng(0)
    a, b = rng.gamma(1.0, 1e-3, (500, 40)).astype(np.float32), rng.gamma(1.0, 1e-3, (500, 40)).astype(np.float32)
    za, zb = rng.random(40) < 0.3, rng.random(40) < 0.3
    assert de.estimate_pseudocounts_offset(a, b, za, zb) == pytest.approx(estimate_pseudocounts_offset(a, b, za, zb))
    probas = pd.Series(rng.random(40), index=[f"g{i}" for i in range(40)])
    pd.testing.assert_series_equal(de.fdr_de_prediction(probas, 0.3), _fdr_de_prediction(probas, 0.3),
                                   check_names=False)  # fmt: skip
    lo, hi = de._credible_interval(a, 0.9)
    np.testing.assert_array_equal(np.stack([lo, hi], axis=1), credible_intervals(a, 0.9))


def test_draw_plan_keeps_scvi_tools_resampling():
    rng = np.random.default_rng(0)
    cells, inverse = de.draw_plan(rng, n_cells=7, n_draws=30)  # S = 30 // 7 + 1 = 5 draws per cell, 35 rows
    assert inverse.shape == (30,) and cells.size == np.unique(inverse).size <= 30 and cells.max() < 7
    cells, inverse = de.draw_plan(rng, n_cells=1000, n_draws=50)  # S = 1: rows are cells
    assert cells.size <= 50 and np.all(np.diff(cells) > 0)


def test_group_counts_streamed_equal_whole():
    import scipy.sparse as sp

    x = sp.random(300, 50, density=0.2, format="csr", random_state=2, dtype=np.float32)
    x.data = np.ceil(x.data * 10)
    whole, parts = de.GroupCounts(50), de.GroupCounts(50)
    whole.add(x)
    for lo in range(0, 300, 64):
        parts.add(x[lo : lo + 64])
    dense = x.toarray()
    expected = {"raw_mean1": dense.mean(0), "non_zeros_proportion1": (dense != 0).mean(0),
                "raw_normalized_mean1": (dense / dense.sum(1, keepdims=True) * 1e4).mean(0)}  # fmt: skip
    for key, value in expected.items():
        np.testing.assert_allclose(whole.properties(parts)[key], value, rtol=1e-5)
        np.testing.assert_allclose(whole.properties(parts)[key.replace("1", "2")], value, rtol=1e-5)


@pytest.fixture(scope="module")
def small(small_atlas: Path, tmp_path_factory) -> tuple[api.Run, anndata.AnnData]:
    adata = anndata.read_h5ad(small_atlas)
    train = {"data": {"batch_key": "batch"}, "model": {"n_hidden": 16, "n_latent": 4},
             "train": {"max_epochs": 1, "progress": False, "num_threads": 1}}  # fmt: skip
    return api.train(adata, tmp_path_factory.mktemp("de-small") / "run", **train), adata


def test_one_vs_rest_list_of_groups_and_seeded(small):
    run, adata = small
    res = analysis.differential_expression(run, adata, "cell_type", ["type_0", "type_1"], n_samples_overall=500)
    assert list(res["comparison"].unique()) == ["type_0 vs Rest", "type_1 vs Rest"] and len(res) == 400
    again = analysis.differential_expression(run, adata, "cell_type", ["type_0", "type_1"], n_samples_overall=500)
    pd.testing.assert_frame_equal(res, again)
    change = analysis.differential_expression(run, adata, "cell_type", "type_0", "type_1", mode="change",
                                              n_samples_overall=300, cred_interval_lvls=[0.5], delta=None)  # fmt: skip
    assert {"lfc_confidence_interval_0.5_min", "lfc_confidence_interval_0.5_max"} <= set(change.columns)
    assert change["delta"].iloc[0] >= 0.1


def test_errors_name_the_column_the_value_and_the_fix(small):
    run, adata = small
    with pytest.raises(InputError, match=r"no obs column 'celltype'; available columns: \['batch', 'cell_type'\]"):
        analysis.differential_expression(run, adata, "celltype", "type_0")
    with pytest.raises(InputError, match=r"no cells with cell_type == 'type_9'; values: 'type_0' \(72\)"):
        analysis.differential_expression(run, adata, "cell_type", "type_9")
    with pytest.raises(InputError, match=r"no cells with cell_type == 'type_1' within the subset"):
        only0 = adata.obs.cell_type.eq("type_0").to_numpy()
        analysis.differential_expression(run, adata, "cell_type", "type_0", "type_1", subset=only0)
    with pytest.raises(InputError, match="batch_correction=True"):
        analysis.differential_expression(run, adata, "cell_type", "type_0", batchid1=["batch_0"])
    with pytest.raises(InputError, match=r"batchid batch 'b7' is not one of the model's 3 batches"):
        analysis.differential_expression(run, adata, "cell_type", "type_0", batch_correction=True, batchid1=["b7"])
    with pytest.raises(InputError, match="choose vanilla or change"):
        analysis.differential_expression(run, adata, "cell_type", "type_0", mode="bayes")


def test_reads_only_the_two_groups_in_bounded_chunks(small, small_atlas, tmp_path):
    run, adata = small
    store = api.open_counts(convert([small_atlas], tmp_path / "s.zarr", batch_key="batch", progress=False).source)
    reads: list[np.ndarray] = []
    read_rows = store.read_rows
    store.read_rows = lambda idx: (reads.append(np.asarray(idx)), read_rows(idx))[1]
    store.read_range = lambda *a: pytest.fail("read_range: whole ranges are never read for DE")
    res = analysis.differential_expression(run, store, "cell_type", "type_0", "type_2", n_samples_overall=400,
                                           subset={"batch": ["batch_0", "batch_1"]}, chunk_cells=50)  # fmt: skip
    ct, batch = adata.obs["cell_type"].to_numpy(), adata.obs["batch"].to_numpy()
    wanted = np.flatnonzero(np.isin(ct, ["type_0", "type_2"]) & np.isin(batch, ["batch_0", "batch_1"]))
    assert max(r.size for r in reads) <= 50
    np.testing.assert_array_equal(np.sort(np.concatenate(reads)), wanted)  # each group cell read once
    assert res["raw_mean1"].sum() > 0 and len(res) == 200
