"""Count likelihoods and the Gaussian KL: parity with scvi-tools, and brute-force checks in float64.

The parity tests feed every combination of a grid of extreme values (zero and huge counts, tiny and huge
rates, zero-inflation logits of +-30, inverse dispersions from 1e-4 to 1e6) to our functions and to
``scvi.distributions``; the float64 tests check the stable ZINB/NB forms against the textbook pmfs.
"""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from scvi_scale.model.distributions import kl_normal, log_nb, log_poisson, log_zinb

RTOL = 1e-5  # the parity target for float32

X_VALUES = [0.0, 1.0, 2.0, 5.0, 17.0, 100.0, 1e3, 1e4, 1e5]
MU_VALUES = [1e-7, 1e-3, 0.5, 5.0, 100.0, 1e4, 1e5]
THETA_VALUES = [1e-4, 1e-2, 0.3, 1.0, 10.0, 1e3, 1e5, 1e6]
LOGIT_VALUES = [-30.0, -5.0, -0.5, 0.0, 2.0, 30.0]


def _grid(*axes: list[float], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Every combination of the axes' values, one flat tensor per axis (the 'genes' axis of one cell)."""
    cols = list(zip(*itertools.product(*axes), strict=True))
    return [torch.tensor(c, dtype=dtype).reshape(1, -1) for c in cols]


def _rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest elementwise |ours - ref| / |ref| (exact zeros must match exactly)."""
    assert torch.isfinite(ref).all()
    diff = (ours.double() - ref.double()).abs()
    denom = ref.double().abs()
    bad = (denom == 0) & (diff > 0)
    assert not bad.any(), "reference is exactly 0 where ours is not"
    return float((diff / denom.clamp_min(1e-300)).max())


@pytest.fixture(scope="module")
def scvi_dist() -> SimpleNamespace:
    """scvi-tools' likelihoods: the public classes and the two functions they call (not re-exported)."""
    public = pytest.importorskip("scvi.distributions")
    private = pytest.importorskip("scvi.distributions._negative_binomial")
    return SimpleNamespace(
        log_zinb_positive=private.log_zinb_positive,
        log_nb_positive=private.log_nb_positive,
        ZeroInflatedNegativeBinomial=public.ZeroInflatedNegativeBinomial,
        NegativeBinomial=public.NegativeBinomial,
        Poisson=public.Poisson,
    )


# -- parity with scvi-tools, float32 ------------------------------------------------------------------------------
@pytest.mark.parity
def test_log_zinb_matches_scvi_on_extreme_grid(scvi_dist) -> None:
    x, mu, theta, logits = _grid(X_VALUES, MU_VALUES, THETA_VALUES, LOGIT_VALUES)
    ours = log_zinb(x, mu, theta, logits)
    ref_fn = scvi_dist.log_zinb_positive(x, mu, theta, logits)
    ref_dist = scvi_dist.ZeroInflatedNegativeBinomial(mu=mu, theta=theta, zi_logits=logits).log_prob(x)
    assert ours.shape == x.shape
    assert torch.isfinite(ours).all()  # the naive log(pi + (1-pi) nb0) is -inf/nan at logits -30 or huge mu
    assert _rel_err(ours, ref_fn) <= RTOL
    assert _rel_err(ours, ref_dist) <= RTOL


@pytest.mark.parity
def test_log_nb_matches_scvi_on_extreme_grid(scvi_dist) -> None:
    x, mu, theta = _grid(X_VALUES, MU_VALUES, THETA_VALUES)
    ours = log_nb(x, mu, theta)
    assert torch.isfinite(ours).all()
    assert _rel_err(ours, scvi_dist.log_nb_positive(x, mu, theta)) <= RTOL
    assert _rel_err(ours, scvi_dist.NegativeBinomial(mu=mu, theta=theta).log_prob(x)) <= RTOL


@pytest.mark.parity
def test_gene_dispersion_broadcasts_like_scvi(scvi_dist) -> None:
    """A (G,) theta (the "gene" dispersion) is shared by all cells, as scvi-tools' ``theta.view(1, G)``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.full((7, 30), 3.0), generator=gen)
    x[:, :5] = 0.0
    mu = torch.rand(7, 30, generator=gen) * 10 + 1e-3
    theta = torch.exp(torch.randn(30, generator=gen) * 2)
    logits = torch.randn(7, 30, generator=gen) * 4
    ours = log_zinb(x, mu, theta, logits)
    assert ours.shape == (7, 30)
    assert _rel_err(ours, scvi_dist.log_zinb_positive(x, mu, theta, logits)) <= RTOL
    assert _rel_err(log_nb(x, mu, theta), scvi_dist.log_nb_positive(x, mu, theta)) <= RTOL


@pytest.mark.parity
def test_zinb_gradients_match_scvi_and_stay_finite(scvi_dist) -> None:
    x, mu0, theta0, logits0 = _grid(X_VALUES[:6], MU_VALUES[1:6], THETA_VALUES[:6], LOGIT_VALUES)
    grads = []
    for fn in (log_zinb, scvi_dist.log_zinb_positive):
        mu, theta, logits = (t.clone().requires_grad_(True) for t in (mu0, theta0, logits0))
        fn(x, mu, theta, logits).sum().backward()
        grads.append([mu.grad, theta.grad, logits.grad])
    for ours, ref in zip(*grads, strict=True):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref, rtol=RTOL, atol=1e-6)


@pytest.mark.parity
def test_log_poisson_matches_torch_and_scvi(scvi_dist) -> None:
    x, rate = _grid(X_VALUES, MU_VALUES + [1e-30, 3e5])
    ours = log_poisson(x, rate)
    assert _rel_err(ours, torch.distributions.Poisson(rate).log_prob(x)) <= RTOL
    assert _rel_err(ours, scvi_dist.Poisson(rate=rate).log_prob(x)) <= RTOL
    # a zero rate (a softmax that underflowed): log p(0) = 0 and log p(x>0) = -inf, as in torch
    zero = torch.zeros(1, 2)
    out = log_poisson(torch.tensor([[0.0, 3.0]]), zero)
    assert out[0, 0].item() == 0.0 and out[0, 1].item() == float("-inf")


# -- brute force, float64 -----------------------------------------------------------------------------------------
# Moderate values only: the stable forms add eps=1e-8 inside every log, which shifts the value by about
# x * 1e-8 / mu, so mu >= 0.1 keeps that below the tolerance.
BF_X = [0.0, 1.0, 2.0, 3.0, 7.0, 20.0, 50.0]
BF_MU = [0.1, 0.7, 4.0, 25.0, 300.0]
BF_THETA = [0.05, 0.5, 2.0, 30.0, 500.0]
BF_LOGITS = [-8.0, -1.5, 0.0, 1.0, 6.0]


def _nb_pmf(x: np.ndarray, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """NB(mean mu, inverse dispersion theta) as scipy's nbinom(n=theta, p=theta/(theta+mu))."""
    return stats.nbinom.pmf(x, theta, theta / (theta + mu))


def test_log_zinb_equals_direct_mixture_float64() -> None:
    x, mu, theta, logits = _grid(BF_X, BF_MU, BF_THETA, BF_LOGITS, dtype=torch.float64)
    ours = log_zinb(x, mu, theta, logits)
    assert ours.dtype == torch.float64
    xs, ms, ts, ls = (t.numpy().ravel() for t in (x, mu, theta, logits))
    pi = 1.0 / (1.0 + np.exp(-ls))  # zero-inflation probability
    direct = np.log(pi * (xs == 0) + (1.0 - pi) * _nb_pmf(xs, ms, ts))
    np.testing.assert_allclose(ours.numpy().ravel(), direct, rtol=1e-6, atol=1e-9)


def test_log_zinb_at_extreme_logits_float64() -> None:
    """At logits +-30 and +-40 the stable form still equals the exact mixture, written with logaddexp.

    log p(0) = log(sigmoid(pi) + sigmoid(-pi) NB(0)) and log p(x > 0) = log sigmoid(-pi) + log NB(x).
    """
    x, mu, theta, logits = _grid(BF_X, BF_MU, BF_THETA, [-40.0, -30.0, 30.0, 40.0], dtype=torch.float64)
    log_nb_exact = torch.from_numpy(stats.nbinom.logpmf(x.numpy(), theta.numpy(), (theta / (theta + mu)).numpy()))
    log_dropout, log_keep = F.logsigmoid(logits), F.logsigmoid(-logits)
    exact = torch.where(x == 0, torch.logaddexp(log_dropout, log_keep + log_nb_exact), log_keep + log_nb_exact)
    ours = log_zinb(x, mu, theta, logits)
    torch.testing.assert_close(ours, exact, rtol=1e-6, atol=1e-9)
    # all-dropout zeros score log 1 = 0 (to 1e-12 at logits 30); no-dropout counts score the NB
    big = (logits >= 30) & (x == 0)
    assert ours[big].abs().max() < 1e-12
    small = logits <= -30
    torch.testing.assert_close(ours[small & (x > 0)], log_nb(x, mu, theta)[small & (x > 0)], rtol=1e-12, atol=1e-12)


def test_log_nb_equals_scipy_float64() -> None:
    x, mu, theta = _grid(BF_X, BF_MU, BF_THETA, dtype=torch.float64)
    xs, ms, ts = (t.numpy().ravel() for t in (x, mu, theta))
    ref = stats.nbinom.logpmf(xs, ts, ts / (ts + ms))
    np.testing.assert_allclose(log_nb(x, mu, theta).numpy().ravel(), ref, rtol=1e-6, atol=1e-9)


def test_log_poisson_equals_scipy_float64() -> None:
    x, rate = _grid(BF_X + [1e3], BF_MU + [1e-5], dtype=torch.float64)
    ref = stats.poisson.logpmf(x.numpy().ravel(), rate.numpy().ravel())
    np.testing.assert_allclose(log_poisson(x, rate).numpy().ravel(), ref, rtol=1e-12)


def test_likelihoods_sum_to_one_float64() -> None:
    """Summed over all counts, exp(log p) is 1 for each likelihood (a normalisation check)."""
    counts = torch.arange(0, 4000, dtype=torch.float64).reshape(-1, 1)
    mu = torch.tensor([[0.3, 6.0, 40.0]], dtype=torch.float64)
    theta = torch.tensor([[0.4, 2.0, 25.0]], dtype=torch.float64)
    logits = torch.tensor([[-2.0, 0.5, 3.0]], dtype=torch.float64)
    for ll in (log_zinb(counts, mu, theta, logits), log_nb(counts, mu, theta), log_poisson(counts, mu)):
        # eps=1e-8 in the logs moves the total by at most ~1e-7
        torch.testing.assert_close(ll.exp().sum(0), torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-6)


# -- KL --------------------------------------------------------------------------------------------------------------
def _kl_inputs(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(3)
    mean_q = torch.randn(64, 10, generator=gen, dtype=dtype) * 3
    var_q = torch.exp(torch.randn(64, 10, generator=gen, dtype=dtype) * 2) + 1e-4
    mean_p = torch.randn(64, 1, generator=gen, dtype=dtype) + 7
    var_p = torch.exp(torch.randn(64, 1, generator=gen, dtype=dtype))
    return mean_q, var_q, mean_p, var_p


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kl_normal_matches_torch(dtype: torch.dtype) -> None:
    from torch.distributions import Normal, kl_divergence

    mean_q, var_q, mean_p, var_p = _kl_inputs(dtype)
    q = Normal(mean_q, var_q.sqrt())
    rtol = 1e-12 if dtype == torch.float64 else RTOL
    # prior N(0, 1): the z term
    torch.testing.assert_close(
        kl_normal(mean_q, var_q).sum(-1), kl_divergence(q, Normal(0.0, 1.0)).sum(-1), rtol=rtol, atol=0
    )
    # per-cell prior, broadcast over the last axis: the library term
    torch.testing.assert_close(
        kl_normal(mean_q, var_q, mean_p, var_p).sum(-1),
        kl_divergence(q, Normal(mean_p, var_p.sqrt())).sum(-1),
        rtol=rtol,
        atol=0,
    )


def test_kl_normal_is_zero_iff_equal() -> None:
    m = torch.tensor([0.0, 1.5, -2.0], dtype=torch.float64)
    v = torch.tensor([1.0, 0.2, 4.0], dtype=torch.float64)
    assert kl_normal(m, v, m, v).abs().max() < 1e-15
    assert (kl_normal(m, v, m + 0.1, v) > 0).all() and (kl_normal(m, v, m, v * 1.1) > 0).all()
