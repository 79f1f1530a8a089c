"""Importance-sampled marginal log-likelihood ``log p(x)``, as scvi-tools' ``get_marginal_ll`` computes it.

With the encoder's posterior ``q(z|x)`` (and ``q(l|x)`` for a latent library) as the proposal and K draws,

    log p(x) ~= logsumexp_k [ log p(z_k) + log p(x | z_k, l_k) - log q(z_k | x)
                              (+ log p(l_k) - log q(l_k | x)) ] - log K

per cell, in eval mode (BatchNorm running statistics, no dropout). This is scvi-tools 1.4.2's
``VAE.marginal_ll`` (``module/_vae.py``) term for term, including its treatment of the logistic-normal latent
(the densities are evaluated at the softmax-transformed z, which scvi-tools does too; only ``"normal"`` gives
a proper estimate). It is a lower bound in expectation that tightens as K grows (K = 1 is the ELBO).

Two deliberate differences: the draws are taken ``samples_per_pass`` at a time (scvi-tools' default is one
forward pass per draw, which is ~100x slower), and the mean over cells weights every cell equally, where
scvi-tools' ``return_mean=True`` averages per-minibatch means (over-weighting a small last minibatch). The
per-cell values are the same estimator; compare them with ``get_marginal_ll(return_mean=False)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch

from scvi_scale.data.batch import Batch
from scvi_scale.model.vae import VAE

__all__ = ["marginal_ll", "marginal_ll_batch"]

_LOG_2PI = math.log(2.0 * math.pi)
_ELEMENTS_PER_PASS = 1 << 23  # draws x cells x genes held at once (~32 MB per float32 intermediate)


def _normal_log_prob(x: torch.Tensor, mean: torch.Tensor | float, var: torch.Tensor | float) -> torch.Tensor:
    """Elementwise ``log N(x; mean, var)`` (as torch's ``Normal(mean, sqrt(var)).log_prob``)."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * ((x - mean) ** 2 / var + torch.log(var) + _LOG_2PI)


@torch.no_grad()
def marginal_ll_batch(
    model: VAE,
    x_ng: torch.Tensor,
    batch_n: torch.Tensor,
    n_mc_samples: int = 1000,
    samples_per_pass: int | None = None,
) -> torch.Tensor:
    """Per-cell importance-sampled ``log p(x)`` of one minibatch, shape ``(n,)``.

    Parameters
    ----------
    model
        The VAE; it is evaluated in eval mode (its training flag is restored afterwards).
    x_ng, batch_n
        Raw counts ``(n, g)`` and integer batch codes ``(n,)``.
    n_mc_samples
        K, the number of importance samples per cell.
    samples_per_pass
        Draws decoded at once; default: as many as keep ``draws x n x g`` under ~8M elements.
    """
    if n_mc_samples < 1:
        raise ValueError(f"n_mc_samples must be >= 1; got {n_mc_samples}")
    n, g = x_ng.shape
    if samples_per_pass is None:
        samples_per_pass = max(1, _ELEMENTS_PER_PASS // max(n * g, 1))
    samples_per_pass = min(int(samples_per_pass), n_mc_samples)
    batch_n = batch_n.reshape(-1).long()
    was_training = model.training
    model.eval()
    try:
        terms = []
        done = 0
        while done < n_mc_samples:
            s = min(samples_per_pass, n_mc_samples - done)
            terms.append(_log_weights(model, x_ng, batch_n, s))
            done += s
    finally:
        model.train(was_training)
    log_w_kn = torch.cat(terms, dim=0)
    return torch.logsumexp(log_w_kn.double(), dim=0) - math.log(n_mc_samples)


def _log_weights(model: VAE, x_ng: torch.Tensor, batch_n: torch.Tensor, s: int) -> torch.Tensor:
    """``log p(z) + log p(x|z,l) - log q(z|x) (+ log p(l) - log q(l|x))`` for ``s`` draws, shape ``(s, n)``."""
    inf = model.inference(x_ng, batch_n, n_samples=s)
    z, library = inf.z, inf.library
    if s == 1:  # inference returns one draw without the sample axis
        z, library = z.unsqueeze(0), library.unsqueeze(0)
    px = model.generative(z, library, batch_n)
    log_px = model.log_likelihood(x_ng, px).sum(dim=-1)
    log_pz = _normal_log_prob(z, 0.0, 1.0).sum(dim=-1)
    log_qz = _normal_log_prob(z, inf.qz_m, inf.qz_v).sum(dim=-1)
    log_w = log_pz + log_px - log_qz
    if inf.ql_m is not None:
        prior_m = model.library_log_means[0][batch_n].unsqueeze(-1)
        prior_v = model.library_log_vars[0][batch_n].unsqueeze(-1)
        log_pl = _normal_log_prob(library, prior_m, prior_v).sum(dim=-1)
        log_ql = _normal_log_prob(library, inf.ql_m, inf.ql_v).sum(dim=-1)
        log_w = log_w + log_pl - log_ql
    return log_w


def marginal_ll(
    model: VAE,
    loader: Iterable[Batch],
    n_mc_samples: int = 1000,
    samples_per_pass: int | None = None,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell ``log p(x)`` over every minibatch a loader yields (streamed; one minibatch in memory at a time).

    Returns
    -------
    ll_n, rows_n
        float64 per-cell estimates (higher is better) and the cells' row numbers, in loader order.
    """
    values, rows = [], []
    for batch in loader:
        batch = batch.to(device)
        ll = marginal_ll_batch(model, batch.x_ng, batch.batch_n, n_mc_samples, samples_per_pass)
        values.append(ll.cpu().numpy())
        rows.append(np.asarray(batch.rows_n))
    if not values:
        return np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(values), np.concatenate(rows)
