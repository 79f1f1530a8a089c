"""Integration metrics, PCA baselines and 2-D views, checked against direct computations on small data."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy.spatial.distance import cdist
from sklearn.decomposition import PCA
from sklearn.metrics import silhouette_score

from scvi_scale.report.embed2d import embed_2d, umap_available
from scvi_scale.report.metrics import (
    expected_entropy,
    integration_summary,
    knn_batch_mixing,
    knn_indices,
    knn_label_accuracy,
    lognorm_pca,
    pca,
    silhouette,
)


@pytest.fixture
def small():
    """300 points in 5-D with overlapping labels and batches, so no metric sits at an extreme."""
    rng = np.random.default_rng(1)
    labels = rng.choice(np.array(["B cell", "T cell", "NK", "mono"]), size=300)
    batch = rng.integers(0, 3, size=300)
    centers = {name: rng.normal(0, 1.2, 5) for name in np.unique(labels)}
    z = np.stack([centers[lab] for lab in labels]) + rng.normal(0, 1, (300, 5)) + 0.4 * batch[:, None]
    return z, labels, batch


def _brute_neighbours(z, k):
    d = cdist(z, z)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def _separated(n_per=200, n_groups=4, seed=0):
    """Far-apart tight clusters; group g holds label g and batch g only."""
    rng = np.random.default_rng(seed)
    group = np.repeat(np.arange(n_groups), n_per)
    z = rng.normal(0, 0.1, (group.size, 8)) + 100.0 * np.eye(n_groups, 8)[group]
    return z, group


def test_knn_indices_match_brute_force(small):
    z, _, _ = small
    np.testing.assert_array_equal(knn_indices(z, 7), _brute_neighbours(z, 7))


def test_knn_indices_exclude_self_among_duplicates():
    z = np.zeros((6, 2))  # every distance ties, so the tree may list any cell first
    idx = knn_indices(z, 3)
    assert idx.shape == (6, 3)
    assert not np.any(idx == np.arange(6)[:, None])
    with pytest.raises(ValueError, match="k must be"):
        knn_indices(z, 6)


def test_knn_label_accuracy_matches_brute_force(small):
    z, labels, _ = small
    k = 10
    nbrs = _brute_neighbours(z, k)
    correct = 0
    for i in range(len(z)):
        votes = labels[nbrs[i]]
        counts = {lab: int(np.sum(votes == lab)) for lab in votes}
        best = max(counts.values())
        pred = next(lab for lab in votes if counts[lab] == best)  # tie: the nearest of the tied labels
        correct += pred == labels[i]
    assert knn_label_accuracy(z, labels, k=k) == pytest.approx(correct / len(z))
    assert 0.3 < correct / len(z) < 0.95  # the fixture is neither trivial nor hopeless


def test_expected_entropy_matches_enumeration():
    q = np.array([0.5, 0.3, 0.2])
    k = 6
    expected = 0.0
    for counts in itertools.product(range(k + 1), repeat=3):
        if sum(counts) != k:
            continue
        prob = math.factorial(k) / math.prod(math.factorial(c) for c in counts) * np.prod(q ** np.array(counts))
        expected += prob * -sum(c / k * math.log(c / k) for c in counts if c)
    assert expected_entropy(q, k) == pytest.approx(expected, rel=1e-12)
    assert expected_entropy(np.array([1.0]), k) == pytest.approx(0.0)


def test_knn_batch_mixing_matches_brute_force(small):
    z, _, batch = small
    k = 12
    nbrs = _brute_neighbours(z, k)
    entropies = []
    for i in range(len(z)):
        p = np.bincount(batch[nbrs[i]], minlength=3) / k
        p = p[p > 0]
        entropies.append(-np.sum(p * np.log(p)))
    q = np.bincount(batch) / len(batch)
    want = np.mean(entropies) / expected_entropy(q, k)
    assert knn_batch_mixing(z, batch, k=k) == pytest.approx(want)
    assert knn_batch_mixing(z, batch.astype(str), k=k) == pytest.approx(want)  # labels may be strings


@pytest.mark.parametrize("n_batches", [2, 5])
def test_random_batches_score_one(n_batches):
    rng = np.random.default_rng(3)
    z = rng.normal(size=(4000, 10))
    batch = rng.integers(0, n_batches, size=4000)
    assert knn_batch_mixing(z, batch, k=15) == pytest.approx(1.0, abs=0.02)
    assert abs(silhouette(z, batch)) < 0.02


def test_separated_groups_give_extremes():
    z, group = _separated()
    assert knn_label_accuracy(z, group) == 1.0
    assert knn_batch_mixing(z, group) == pytest.approx(0.0, abs=1e-12)
    assert silhouette(z, group) > 0.99
    summary = integration_summary(z, group, group)
    assert summary["integration/knn_label_accuracy"] == 1.0
    assert summary["integration/batch_mixing"] == pytest.approx(0.0, abs=1e-12)
    assert summary["integration/silhouette_batch"] > 0.99


def test_single_batch_and_single_label_are_nan():
    z = np.random.default_rng(0).normal(size=(50, 3))
    ones = np.ones(50, dtype=int)
    assert math.isnan(knn_batch_mixing(z, ones))
    assert math.isnan(silhouette(z, ones))


def test_silhouette_matches_sklearn(small):
    z, labels, batch = small
    assert silhouette(z, labels) == pytest.approx(silhouette_score(z, labels), abs=1e-10)
    assert silhouette(z, batch) == pytest.approx(silhouette_score(z, batch), abs=1e-10)
    with_singleton = labels.copy()
    with_singleton[0] = "lonely"  # sklearn scores a one-cell cluster 0; so must we
    assert silhouette(z, with_singleton) == pytest.approx(silhouette_score(z, with_singleton), abs=1e-10)


def test_silhouette_chunks_agree_with_sklearn():
    """More cells than one distance chunk, so the chunk boundaries are exercised."""
    rng = np.random.default_rng(5)
    z = rng.normal(size=(2500, 4))
    labels = (z[:, 0] > 0).astype(int) + rng.integers(0, 2, 2500)
    assert silhouette(z, labels, max_cells=None) == pytest.approx(silhouette_score(z, labels), abs=1e-10)


def test_subsampling_is_seeded(small):
    z, labels, batch = small
    a = knn_label_accuracy(z, labels, k=5, max_cells=150, seed=7)
    assert knn_label_accuracy(z, labels, k=5, max_cells=150, seed=7) == a
    others = {knn_label_accuracy(z, labels, k=5, max_cells=150, seed=s) for s in range(8, 14)}
    assert len(others | {a}) > 1  # the seed really picks different cells
    assert knn_label_accuracy(z, labels, k=5, max_cells=300) == knn_label_accuracy(z, labels, k=5, max_cells=None)
    s1 = integration_summary(z, labels, batch, k=5, max_cells=200, seed=3)
    s2 = integration_summary(z, labels, batch, k=5, max_cells=200, seed=3)
    assert s1 == s2
    # subsample by hand: the metric on the chosen rows equals the metric asked to subsample
    keep = np.sort(np.random.default_rng(3).choice(300, size=200, replace=False))
    assert s1["integration/batch_mixing"] == pytest.approx(knn_batch_mixing(z[keep], batch[keep], k=5))


def test_integration_summary_keys(small):
    z, labels, batch = small
    summary = integration_summary(z, labels, batch)
    assert set(summary) == {
        "integration/knn_label_accuracy",
        "integration/batch_mixing",
        "integration/silhouette_label",
        "integration/silhouette_batch",
    }
    assert all(isinstance(v, float) and math.isfinite(v) for v in summary.values())
    with pytest.raises(ValueError, match="entries"):
        integration_summary(z, labels[:-1], batch)


def _aligned(a, b):
    """b with each column's sign flipped to agree with a."""
    return b * np.sign(np.sum(a * b, axis=0))


def test_pca_exact_matches_sklearn():
    x = np.random.default_rng(0).normal(size=(120, 15)) @ np.diag(np.linspace(3, 0.2, 15))
    ours = pca(x, n_components=4, method="exact")
    ref = PCA(n_components=4, svd_solver="full").fit_transform(x)
    np.testing.assert_allclose(ours, _aligned(ours, ref), atol=1e-10)
    assert pca(x, n_components=50).shape == (120, 15)  # capped at min(n, d)


def test_pca_randomized_dense_and_sparse_agree_with_exact():
    rng = np.random.default_rng(2)
    low_rank = rng.normal(size=(800, 6)) @ (rng.normal(size=(6, 600)) * np.arange(6, 0, -1)[:, None])
    # a clear gap after the 6th singular value, where a few power iterations converge to the exact answer
    x = np.clip(low_rank + rng.normal(0, 0.1, (800, 600)), 0.0, None) + 1.0
    exact = pca(x, n_components=5, method="exact")
    dense = pca(x, n_components=5, method="randomized")
    sparse = pca(sp.csr_matrix(x), n_components=5, method="randomized")
    np.testing.assert_allclose(dense, exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    np.testing.assert_allclose(sparse, dense, rtol=1e-9, atol=1e-9 * np.abs(exact).max())
    with pytest.raises(ValueError, match="method"):
        pca(x, method="magic")


def test_pca_randomized_captures_variance_of_a_flat_spectrum():
    """Count-like data without a spectral gap: scores differ from exact, but the variance captured must not."""
    rng = np.random.default_rng(6)
    x = np.log1p(rng.poisson(rng.gamma(0.3, 3.0, size=(1, 700)) * rng.gamma(2.0, 0.5, size=(900, 1))))
    exact = pca(x, n_components=30, method="exact")
    randomized = pca(sp.csr_matrix(x), n_components=30, method="randomized")
    assert randomized.var(axis=0).sum() == pytest.approx(exact.var(axis=0).sum(), rel=0.01)


def _lognorm_reference(counts, target_sum, n_top):
    x = counts.astype(np.float64)
    total = x.sum(axis=1, keepdims=True)
    x = np.log1p(np.divide(x * target_sum, total, out=np.zeros_like(x), where=total > 0))
    top = np.sort(np.argsort(-x.var(axis=0), kind="stable")[:n_top])
    return x[:, top]


def test_lognorm_pca_matches_dense_reference():
    rng = np.random.default_rng(4)
    rates = rng.gamma(0.5, 2.0, size=(1, 80)) * rng.choice([0.5, 2.0], size=(300, 1))
    counts = rng.poisson(rates)
    counts[7] = 0  # an empty cell must not produce NaN
    csr = sp.csr_matrix(counts)
    before = csr.copy()
    ours = lognorm_pca(csr, n_components=5, target_sum=1e3, n_top_genes=40)
    ref = PCA(n_components=5, svd_solver="full").fit_transform(_lognorm_reference(counts, 1e3, 40))
    np.testing.assert_allclose(ours, _aligned(ours, ref), atol=1e-8)
    assert (csr != before).nnz == 0  # input untouched
    assert np.isfinite(ours).all()


def test_lognorm_pca_large_sparse_shape():
    counts = sp.random(3000, 2500, density=0.05, format="csr", random_state=0, dtype=np.float32)
    counts.data = np.ceil(counts.data * 5)
    out = lognorm_pca(counts, n_components=30)
    assert out.shape == (3000, 30)
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out, lognorm_pca(counts, n_components=30))  # seeded solver


def test_embed_2d_pca():
    z = np.random.default_rng(0).normal(size=(200, 10))
    coords, name = embed_2d(z, method="pca")
    assert name == "pca"
    np.testing.assert_allclose(coords, pca(z, n_components=2))
    coords_one, _ = embed_2d(z[:, :1], method="pca")  # 1-D input: second axis is zero
    assert coords_one.shape == (200, 2) and np.all(coords_one[:, 1] == 0)
    with pytest.raises(ValueError, match="method"):
        embed_2d(z, method="tsne")


def test_embed_2d_auto_picks_available_method():
    z = np.random.default_rng(0).normal(size=(5, 3))  # too few cells for UMAP: always PCA
    assert embed_2d(z)[1] == "pca"
    if not umap_available():
        assert embed_2d(np.random.default_rng(0).normal(size=(100, 3)))[1] == "pca"
        with pytest.raises(ImportError, match="umap-learn"):
            embed_2d(z, method="umap")


@pytest.mark.slow
@pytest.mark.skipif(not umap_available(), reason="umap-learn not installed")
def test_embed_2d_umap_is_seeded():
    z, _ = _separated(n_per=60, n_groups=3)
    coords, name = embed_2d(z, seed=1)
    assert name == "umap" and coords.shape == (180, 2)
    np.testing.assert_array_equal(coords, embed_2d(z, seed=1)[0])
