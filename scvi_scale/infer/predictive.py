"""Posterior predictive counts, as scvi-tools' ``VAE.sample``: z ~ q(z|x), then x ~ p(x|z, l).

NB and ZINB counts are drawn as a Gamma-Poisson mixture (``Gamma(theta, theta / mu)``, clamped at 1e8, then
Poisson); ZINB then zeroes each entry with probability ``sigmoid(zi_logits)``; Poisson rates are clamped at 1e8.
"""

from __future__ import annotations

import torch

from scvi_scale.model.vae import VAE, Generative

__all__ = ["expected_counts", "predictive_minibatch", "sample_counts"]

MAX_RATE = 1e8


def sample_counts(likelihood: str, px: Generative) -> torch.Tensor:
    """One draw of counts from p(x | z, l) with the decoder's parameters ``px`` (any leading shape)."""
    if likelihood == "poisson":
        return torch.poisson(torch.clamp(px.rate, max=MAX_RATE))
    assert px.theta is not None
    theta = px.theta.expand_as(px.rate)
    gamma = torch.distributions.Gamma(concentration=theta, rate=theta / px.rate).sample()
    counts = torch.poisson(torch.clamp(gamma, max=MAX_RATE))
    if likelihood == "zinb":
        assert px.zi_logits is not None
        dropped = torch.rand_like(counts) <= torch.sigmoid(px.zi_logits)
        counts = torch.where(dropped, torch.zeros_like(counts), counts)
    return counts


def expected_counts(likelihood: str, px: Generative) -> torch.Tensor:
    """E[x | z, l]: ``mu`` (NB, Poisson) or ``(1 - sigmoid(zi_logits)) * mu`` (ZINB)."""
    if likelihood == "zinb":
        assert px.zi_logits is not None
        return (1.0 - torch.sigmoid(px.zi_logits)) * px.rate
    return px.rate


@torch.no_grad()
def predictive_minibatch(
    model: VAE, x_ng: torch.Tensor, batch_n: torch.Tensor, n_samples: int = 1, code: int | None = None
) -> torch.Tensor:
    """Counts drawn from the posterior predictive of each cell: ``(n, G)``, or ``(n, G, n_samples)``."""
    batch_n = batch_n.reshape(-1).long()
    inf = model.inference(x_ng, batch_n, n_samples=n_samples)
    px = model.generative(inf.z, inf.library, batch_n, transform_batch=code)
    counts = sample_counts(model.config.gene_likelihood, px)
    return counts.permute(1, 2, 0) if n_samples > 1 else counts
