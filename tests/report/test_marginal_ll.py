"""Importance-sampled marginal log-likelihood against brute-force quadrature and against scvi-tools itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scvi_scale.model import VAE, ModelConfig
from scvi_scale.report.marginal_ll import marginal_ll_batch
from tests.report import report_fixtures

trained_run = report_fixtures.trained_run  # the shared session fixture


def _tiny(observed_lib: bool, likelihood: str = "nb") -> tuple[VAE, torch.Tensor, torch.Tensor]:
    """A one-dimensional latent model on 6 cells x 12 genes (random weights, eval mode) and its data."""
    torch.manual_seed(3)
    cfg = ModelConfig(n_latent=1, n_hidden=8, gene_likelihood=likelihood, use_observed_lib_size=observed_lib)
    priors = (None, None) if observed_lib else (np.array([3.2, 3.6]), np.array([0.3, 0.5]))
    model = VAE(12, 2, cfg, *priors).eval()
    if not observed_lib:  # centre q(l|x) near the observed log library, so the proposal is a sensible one
        with torch.no_grad():
            model.l_encoder.mean_encoder.weight.mul_(0.1)
            model.l_encoder.mean_encoder.bias.fill_(3.9)
            model.l_encoder.var_encoder.weight.mul_(0.1)
            model.l_encoder.var_encoder.bias.fill_(-3.0)
    rng = np.random.default_rng(0)
    x_ng = torch.as_tensor(rng.poisson(rng.gamma(2.0, 2.0, size=(6, 12))), dtype=torch.float32)
    x_ng[:, 0] += 1  # no empty cell
    return model, x_ng, torch.tensor([0, 1, 0, 1, 1, 0])


def _grid(lo: float, hi: float, n: int) -> tuple[torch.Tensor, float]:
    pts = torch.linspace(lo, hi, n, dtype=torch.float64)
    return pts, float(pts[1] - pts[0])


@torch.no_grad()
def _brute_force(model: VAE, x_ng: torch.Tensor, batch_n: torch.Tensor) -> torch.Tensor:
    """``log p(x) = log int p(x|z,l) p(z) (p(l)) dz (dl)`` by the trapezoid-free Riemann sum on a fine grid."""
    normal = torch.distributions.Normal
    z_s, dz = _grid(-7.0, 7.0, 1401)
    if model.config.use_observed_lib_size:
        library = torch.log(x_ng.sum(1, keepdim=True))
        z = z_s.float().reshape(-1, 1, 1).expand(-1, x_ng.shape[0], 1)
        px = model.generative(z, library.expand(z.shape[0], -1, -1), batch_n)
        log_joint = model.log_likelihood(x_ng, px).sum(-1).double() + normal(0, 1).log_prob(z_s)[:, None]
        return torch.logsumexp(log_joint, 0) + math.log(dz)
    l_s, dl = _grid(0.0, 7.0, 281)
    z_s, dz = _grid(-6.0, 6.0, 241)
    zz, ll = torch.meshgrid(z_s, l_s, indexing="ij")
    zz, ll = zz.reshape(-1), ll.reshape(-1)
    n = x_ng.shape[0]
    z = zz.float().reshape(-1, 1, 1).expand(-1, n, 1)
    lib = ll.float().reshape(-1, 1, 1).expand(-1, n, 1)
    px = model.generative(z, lib, batch_n)
    prior_m = model.library_log_means[0][batch_n].double()
    prior_s = model.library_log_vars[0][batch_n].double().sqrt()
    log_joint = (
        model.log_likelihood(x_ng, px).sum(-1).double()
        + normal(0, 1).log_prob(zz)[:, None]
        + normal(prior_m, prior_s).log_prob(ll[:, None])
    )
    return torch.logsumexp(log_joint, 0) + math.log(dz * dl)


@pytest.mark.parametrize("observed_lib", [True, False], ids=["observed-library", "latent-library"])
def test_marginal_ll_matches_quadrature(observed_lib):
    model, x_ng, batch_n = _tiny(observed_lib)
    exact = _brute_force(model, x_ng, batch_n)
    torch.manual_seed(0)
    estimate = marginal_ll_batch(model, x_ng, batch_n, n_mc_samples=20_000, samples_per_pass=5_000)
    # 20k importance samples: the estimator's bias and spread are far below 0.05 nats on these cells
    np.testing.assert_allclose(estimate.numpy(), exact.numpy(), atol=0.05)
    # and one sample is the (stochastic) ELBO, a lower bound: on average below the truth
    torch.manual_seed(0)
    one = torch.stack([marginal_ll_batch(model, x_ng, batch_n, n_mc_samples=1) for _ in range(200)]).mean(0)
    assert (one < exact).all()


def test_marginal_ll_zinb_draws_in_passes_equal_one_pass():
    model, x_ng, batch_n = _tiny(True, "zinb")
    torch.manual_seed(5)
    a = marginal_ll_batch(model, x_ng, batch_n, n_mc_samples=64, samples_per_pass=64)
    torch.manual_seed(5)
    b = marginal_ll_batch(model, x_ng, batch_n, n_mc_samples=64, samples_per_pass=16)
    assert a.shape == (6,) and torch.isfinite(a).all()
    # different draws (one extra single draw per pass), the same estimand: close, not equal
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=0.5)


@pytest.mark.parity
@pytest.mark.slow
def test_marginal_ll_agrees_with_scvi_tools(trained_run, small_atlas, tmp_path):
    scvi = pytest.importorskip("scvi")
    import warnings

    import anndata

    from scvi_scale import api
    from scvi_scale.report.quality import compute_quality

    out = api.export_scvi_tools(trained_run, tmp_path / "st")
    adata = anndata.read_h5ad(small_atlas)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = scvi.model.SCVI.load(str(out), adata=adata, accelerator="cpu")
        val = np.load(trained_run.path / "split.npz")["validation"]
        torch.manual_seed(1)
        theirs = model.get_marginal_ll(adata, indices=val, n_mc_samples=200, return_mean=False).numpy()
    ours_q = compute_quality(
        trained_run, small_atlas, marginal_ll=True, n_mc_samples=200, use_scib=False, max_cells=200, seed=2
    )
    from scvi_scale.data.memory import MemoryLoader
    from scvi_scale.report.marginal_ll import marginal_ll

    store, loader = api._aligned_loader(trained_run, small_atlas, 128)
    torch.manual_seed(2)
    ours, rows = marginal_ll(trained_run.model, MemoryLoader(store.X, loader.batch_codes, val, 128, shuffle=False), 200)
    assert np.array_equal(rows, val)
    diff = ours - theirs
    se = diff.std(ddof=1) / math.sqrt(len(diff))
    assert abs(diff.mean()) < 4 * se + 1e-3, (diff.mean(), se)
    assert ours_q.numbers["marginal_ll"] == pytest.approx(ours.mean(), abs=8 * se + 1e-3)
