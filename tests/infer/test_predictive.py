"""Posterior predictive samples: draw-for-draw equal to scvi-tools' ``posterior_predictive_sample`` on the same
weights and seed, distribution-correct (means and variances of many draws against the likelihood's, and the API's
mean against the model's expected counts), with scvi-tools' shapes; cells chosen by rows, mask or obs values."""

from __future__ import annotations

from pathlib import Path

import anndata
import numpy as np
import pytest
import torch

from scvi_scale import analysis, api
from scvi_scale.infer.predictive import expected_counts, predictive_minibatch, sample_counts
from scvi_scale.model.vae import Generative
from scvi_scale.store.errors import InputError

TRAIN = {"data": {"batch_key": "batch", "batch_size": 128}, "model": {"n_hidden": 32, "n_latent": 6},
         "train": {"max_epochs": 3, "progress": False, "num_threads": 1}}  # fmt: skip


@pytest.fixture(scope="module")
def adata(small_atlas: Path) -> anndata.AnnData:
    return anndata.read_h5ad(small_atlas)


@pytest.fixture(scope="module")
def run(adata, tmp_path_factory) -> api.Run:
    return api.train(adata, tmp_path_factory.mktemp("pp") / "run", **TRAIN)


@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_many_draws_have_the_likelihoods_mean_and_variance(likelihood):
    gen = torch.Generator().manual_seed(0)
    mu = torch.rand(8, 30, generator=gen) * 20 + 0.05
    theta = torch.rand(30, generator=gen) * 5 + 0.2
    logits = torch.randn(8, 30, generator=gen)
    px = Generative(scale=mu / mu.sum(1, keepdim=True), rate=mu.expand(20_000, 8, 30),
                    theta=None if likelihood == "poisson" else theta, zi_logits=logits)  # fmt: skip
    torch.manual_seed(1)
    x = sample_counts(likelihood, px)
    assert torch.equal(x, x.round()) and (x >= 0).all()
    mean = expected_counts(likelihood, px)[0]
    var = mu if likelihood == "poisson" else mu + mu**2 / theta
    if likelihood == "zinb":  # a mixture of 0 (probability pi) and NB
        pi = torch.sigmoid(logits)
        var = (1 - pi) * (var + mu**2) - mean**2
    z = (x.mean(0) - mean) / (var / x.shape[0]).sqrt()
    assert z.abs().max() < 4.5  # 240 entries
    assert ((x.var(0) / var) - 1).abs().max() < 0.2  # the sample variance of 20,000 heavy-tailed draws


@pytest.fixture(scope="module")
def scvi_model(run, adata, tmp_path_factory):
    scvi = pytest.importorskip("scvi")
    path = api.export_scvi_tools(run, tmp_path_factory.mktemp("pp-st") / "scvi")
    model = scvi.model.SCVI.load(str(path), adata=adata.copy())
    model.module.eval()
    return model


@pytest.mark.slow  # sparse.GCXS (scvi-tools' output) compiles with numba on first use: ~15 s
@pytest.mark.parity
@pytest.mark.parametrize("n_samples", [1, 3])
def test_draw_for_draw_equal_to_scvi_tools(run, adata, scvi_model, n_samples):
    torch.manual_seed(4)
    theirs = scvi_model.posterior_predictive_sample(indices=np.arange(256), n_samples=n_samples,
                                                    transform_batch="batch_2", batch_size=128)  # fmt: skip
    torch.manual_seed(4)
    torch.empty((), dtype=torch.int64).random_()  # what scvi-tools' DataLoader draws before the first minibatch
    codes = torch.from_numpy(adata.obs["batch"].cat.codes.to_numpy().astype(np.int64))
    ours = torch.cat([
        predictive_minibatch(run.model, torch.from_numpy(adata.X[lo : lo + 128].toarray()), codes[lo : lo + 128],
                             n_samples=n_samples, code=2)
        for lo in range(0, 256, 128)
    ])  # fmt: skip
    assert theirs.shape == tuple(ours.shape) == ((256, 200) if n_samples == 1 else (256, 200, n_samples))
    np.testing.assert_array_equal(theirs.todense(), ours.numpy())


def test_mean_of_many_samples_is_the_models_expected_count(run, adata):
    rows = np.r_[np.arange(301, 340), 5]  # 40 cells, in the order given
    s = 1000
    x = analysis.posterior_predictive_sample(run, adata, rows, n_samples=s, seed=1)
    assert x.shape == (40, 200, s) and x.dtype == np.float32
    # E[x] = E_z[(1 - pi) mu], by many draws of z (independent of the samples above)
    torch.manual_seed(2)
    x_ng = torch.from_numpy(adata.X[rows].toarray())
    batch_n = torch.from_numpy(adata.obs["batch"].cat.codes.to_numpy()[rows].astype(np.int64))
    with torch.no_grad():
        inf = run.model.inference(x_ng, batch_n, n_samples=5_000)
        expected = expected_counts("zinb", run.model.generative(inf.z, inf.library, batch_n)).mean(0).numpy()
    se = x.std(axis=2, ddof=1) / np.sqrt(s)
    z = (x.mean(axis=2) - expected) / np.maximum(se, 1e-3)
    assert np.abs(z).max() < 5.0  # 8,000 entries
    # E z**2 = 1 per entry; a cell's genes share its z draws, so only the 40 cells are independent: the mean of
    # z**2 over a cell's genes has variance <= 2 (fully correlated: chi-square, 1 dof), over 40 cells sd <= 0.22
    assert 0.3 < float(np.mean(z**2)) < 1.9


def test_shapes_cells_genes_and_errors(run, adata):
    one = analysis.posterior_predictive_sample(run, adata, [3, 1], genes=["gene_0009", "gene_0002"])
    assert one.shape == (2, 2)
    sparse = pytest.importorskip("sparse")
    out = analysis.posterior_predictive_sample(run, adata, {"cell_type": "type_0"}, n_samples=2, output="sparse")
    assert isinstance(out, sparse.GCXS) and out.shape == (72, 200, 2)
    mask = adata.obs["batch"].eq("batch_1").to_numpy()
    assert analysis.posterior_predictive_sample(run, adata, mask).shape == (int(mask.sum()), 200)
    with pytest.raises(InputError, match=r"transform batch 'nope'"):
        analysis.posterior_predictive_sample(run, adata, [0], transform_batch="nope")
    with pytest.raises(InputError, match=r"cell rows must lie in \[0, 600\)"):
        analysis.posterior_predictive_sample(run, adata, [600])
    with pytest.raises(InputError, match="gene 'X'"):
        analysis.posterior_predictive_sample(run, adata, [0], genes=["X"])
