"""Latent embeddings (posterior mean and variance) for every cell a loader yields, in its order."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from scvi_scale.data.batch import Batch
from scvi_scale.model.vae import VAE


@torch.no_grad()
def latent_representation(
    model: VAE, loader: Iterable[Batch], device: str | torch.device = "cpu", mc_samples: int = 5000
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Posterior mean and variance of z for each cell, and the rows they belong to.

    As scvi-tools' ``get_latent_representation(give_mean=True, return_dist=True)``: the encoder's mean
    ``qz_m`` (for a logistic-normal latent, the mean of softmax over ``mc_samples`` draws) and ``qz_v``.
    The model runs in eval mode (BatchNorm running statistics, no dropout).

    Returns
    -------
    mean_nk, var_nk, rows_n
        float32 arrays, one row per cell in loader order, and the cells' row numbers.
    """
    was_training = model.training
    model.eval()
    means, variances, rows = [], [], []
    for batch in loader:
        batch = batch.to(device)
        x_in = torch.log1p(batch.x_ng) if model.config.log_variational else batch.x_ng
        qz_m, qz_v = model.z_encoder(x_in, batch.batch_n)
        if model.config.latent_distribution == "ln":
            eps = torch.randn((mc_samples, *qz_m.shape), device=qz_m.device)
            qz_m = torch.softmax(qz_m + eps * qz_v.sqrt(), dim=-1).mean(dim=0)
        means.append(qz_m.float().cpu().numpy())
        variances.append(qz_v.float().cpu().numpy())
        rows.append(np.asarray(batch.rows_n))
    model.train(was_training)
    if not means:
        return (
            np.zeros((0, model.config.n_latent), np.float32),
            np.zeros((0, model.config.n_latent), np.float32),
            np.zeros(0, np.int64),
        )
    return np.concatenate(means), np.concatenate(variances), np.concatenate(rows)
