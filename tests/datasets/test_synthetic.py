"""The synthetic atlas: deterministic, chunking-independent, realistic sparsity, visible batch and type structure."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from scvi_scale.datasets import SyntheticSpec, draw_params, generate_rows, iter_chunks, make_anndata, write_h5ad
from scvi_scale.datasets.synthetic import BLOCK_ROWS, _sample_nb_csr
from scvi_scale.store import InputError, read_h5ad

SMALL = SyntheticSpec(n_cells=2_500, n_genes=300, n_batches=3, n_cell_types=5, seed=7, chunk_size=1_000)


def _stack(spec: SyntheticSpec) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    chunks = list(iter_chunks(spec))
    return (
        sp.vstack([c.x_ng for c in chunks], format="csr"),
        np.concatenate([c.batch for c in chunks]),
        np.concatenate([c.cell_type for c in chunks]),
    )


def _assert_same(a: tuple, b: tuple) -> None:
    assert (a[0] != b[0]).nnz == 0 and a[0].shape == b[0].shape
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[2], b[2])


@pytest.fixture(scope="module")
def default_genes():
    """Default gene count and knobs, fewer cells: what sparsity and library size depend on."""
    spec = SyntheticSpec(n_cells=3_000, seed=3)
    return spec, make_anndata(spec)


def test_deterministic_and_seed_dependent() -> None:
    _assert_same(_stack(SMALL), _stack(SMALL))
    other = _stack(dataclasses.replace(SMALL, seed=8))
    assert (other[0] != _stack(SMALL)[0]).nnz > 0


@pytest.mark.parametrize("chunk_size", [1, 777, BLOCK_ROWS, 2_500, 100_000])
def test_independent_of_chunk_size(chunk_size: int) -> None:
    spec = (
        dataclasses.replace(SMALL, chunk_size=chunk_size)
        if chunk_size > 1
        else dataclasses.replace(SMALL, n_cells=300, chunk_size=1)
    )
    reference = _stack(dataclasses.replace(spec, chunk_size=BLOCK_ROWS))
    _assert_same(_stack(spec), reference)


def test_chunks_are_contiguous_and_bounded() -> None:
    chunks = list(iter_chunks(SMALL))
    assert [c.start for c in chunks] == [0, 1_000, 2_000]
    assert [c.stop for c in chunks] == [1_000, 2_000, 2_500]
    for c in chunks:
        assert isinstance(c.x_ng, sp.csr_matrix) and c.x_ng.dtype == np.float32
        assert c.x_ng.shape == (c.stop - c.start, SMALL.n_genes)
        assert c.batch.shape == c.cell_type.shape == (c.stop - c.start,)


def test_random_access_matches_stream() -> None:
    x_ng, batch, cell_type = _stack(SMALL)
    part = generate_rows(SMALL, 1_000, 2_100)
    assert part.start == 1_000 and part.stop == 2_100
    _assert_same(
        (part.x_ng, part.batch, part.cell_type), (x_ng[1_000:2_100], batch[1_000:2_100], cell_type[1_000:2_100])
    )


def test_global_parameters_do_not_depend_on_n_cells() -> None:
    a, b = draw_params(SMALL), draw_params(dataclasses.replace(SMALL, n_cells=10))
    np.testing.assert_array_equal(a.prob_btg, b.prob_btg)
    # and the first rows are the same whatever the total
    _assert_same(_stack(dataclasses.replace(SMALL, n_cells=100)), tuple(v[:100] for v in _stack(SMALL)))


def test_counts_are_integers_and_every_cell_non_empty() -> None:
    x_ng, _, _ = _stack(SMALL)
    np.testing.assert_array_equal(x_ng.data, np.rint(x_ng.data))
    assert (x_ng.data > 0).all()
    assert (np.asarray(x_ng.sum(axis=1)).ravel() > 0).all()


def test_empty_cells_get_one_count() -> None:
    spec = SyntheticSpec(n_cells=400, n_genes=50, library_median=0.3, seed=1)
    x_ng, _, _ = _stack(spec)
    total_n = np.asarray(x_ng.sum(axis=1)).ravel()
    assert total_n.min() >= 1
    assert (total_n == 1).mean() > 0.3  # most cells hit the fix at this depth


def test_sparsity_and_library_size(default_genes) -> None:
    spec, adata = default_genes
    density = adata.X.nnz / np.prod(adata.shape)
    library_n = np.asarray(adata.X.sum(axis=1)).ravel()
    assert 0.05 <= density <= 0.15, density
    assert 2_000 <= np.median(library_n) <= 5_000, np.median(library_n)


def _pcs(x_ng: sp.csr_matrix, n_top: int = 300, n_pcs: int = 20) -> np.ndarray:
    """PCA of log1p(CP10k) on the most variable genes (eigh of the gene covariance: cheaper than an SVD)."""
    library_n = np.asarray(x_ng.sum(axis=1)).ravel()
    logn_ng = np.log1p(x_ng.multiply(1e4 / library_n[:, None]).tocsr().toarray())
    top = np.argsort(logn_ng.var(axis=0))[-n_top:]
    centred = logn_ng[:, top] - logn_ng[:, top].mean(axis=0)
    _, vecs = np.linalg.eigh(centred.T @ centred)
    return centred @ vecs[:, ::-1][:, :n_pcs]


def _centroid_accuracy(pcs: np.ndarray, labels: np.ndarray) -> float:
    cats = np.unique(labels)
    centroids = np.stack([pcs[labels == c].mean(axis=0) for c in cats])
    nearest = ((pcs[:, None, :] - centroids[None]) ** 2).sum(axis=-1).argmin(axis=1)
    return float((cats[nearest] == labels).mean())


def test_cell_types_and_batches_visible_in_pca(default_genes) -> None:
    spec, adata = default_genes
    pcs = _pcs(adata.X)
    cell_type = adata.obs["cell_type"].to_numpy().astype(str)
    batch = adata.obs["batch"].to_numpy().astype(str)
    assert _centroid_accuracy(pcs, cell_type) > 0.95
    # the batch effect within each cell type (types are unevenly spread over batches, so look inside them)
    for t in np.unique(cell_type):
        in_t = cell_type == t
        if len(np.unique(batch[in_t])) > 1 and in_t.sum() > 50:
            assert _centroid_accuracy(pcs[in_t], batch[in_t]) > 2.0 / spec.n_batches


def test_make_anndata_layout() -> None:
    adata = make_anndata(SMALL)
    assert adata.shape == (2_500, 300)
    assert adata.obs_names[0] == "cell_0000000" and adata.obs_names[-1] == "cell_0002499"
    assert adata.var_names[0] == "gene_0000" and adata.var_names[-1] == "gene_0299"
    assert list(adata.obs.columns) == ["batch", "cell_type"]
    assert isinstance(adata.obs["batch"].dtype, pd.CategoricalDtype)
    assert list(adata.obs["batch"].cat.categories) == ["batch_0", "batch_1", "batch_2"]
    assert list(adata.obs["cell_type"].cat.categories) == [f"type_{i}" for i in range(5)]
    assert isinstance(adata.X, sp.csr_matrix) and adata.X.dtype == np.float32


def test_names_sort_numerically_beyond_ten() -> None:
    spec = SyntheticSpec(n_cells=50, n_genes=20, n_batches=12, n_cell_types=11)
    assert spec.batch_names[2] == "batch_02" and sorted(spec.batch_names) == spec.batch_names
    assert sorted(spec.cell_type_names) == spec.cell_type_names


def test_write_h5ad_round_trip(tmp_path: Path) -> None:
    path = write_h5ad(SMALL, tmp_path / "synthetic.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["synthetic.h5ad"]  # no temporary left behind
    store = read_h5ad(path)
    x_ng, batch, _ = _stack(SMALL)
    assert (store.X != x_ng).nnz == 0
    codes_n, cats = store.batch_codes("batch")
    assert cats == SMALL.batch_names
    np.testing.assert_array_equal(np.asarray(cats)[codes_n], batch)


@pytest.mark.parametrize("mu, theta", [(0.02, 0.5), (1.0, 0.5), (40.0, 0.5), (5.0, 4.0)])
def test_nb_sampler_moments(mu: float, theta: float) -> None:
    rng = np.random.default_rng(0)
    x = _sample_nb_csr(rng, np.full((400, 500), mu, np.float32), np.full(500, theta, np.float32)).toarray()
    p0 = (theta / (theta + mu)) ** theta
    se = np.sqrt((mu + mu**2 / theta) / x.size)
    assert abs(x.mean() - mu) < 5 * se
    assert abs((x == 0).mean() - p0) < 5 * np.sqrt(p0 * (1 - p0) / x.size)
    np.testing.assert_allclose(x.var(), mu + mu**2 / theta, rtol=0.1)


@pytest.mark.parametrize("field, value", [("n_cells", 0), ("n_genes", 0), ("seed", -1), ("dropout_mean", 1.0)])
def test_spec_validation(field: str, value: float) -> None:
    with pytest.raises(InputError, match="synthetic spec"):
        SyntheticSpec(**{field: value})
