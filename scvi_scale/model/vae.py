"""The scVI variational autoencoder and its loss, numerically matching scvi-tools' ``VAE``.

The loss of a minibatch is the mean over cells of
``reconstruction (summed over genes) + kl_weight * KL(q(z|x) || N(0, I)) + KL(q(l|x) || p(l))``
(the last term only when the library is latent). Only ``kl_z`` is warmed up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from scvi_scale.model.config import ModelConfig
from scvi_scale.model.distributions import (
    Nonzero,
    kl_normal,
    log_nb,
    log_poisson,
    log_zinb,
    nb_rowsum,
    poisson_rowsum,
    zinb_rowsum,
)
from scvi_scale.model.layers import Decoder, Encoder


@dataclass
class LossTerms:
    """Per-cell loss terms of one minibatch and the scalar to minimise.

    ``reconstruction_n``, ``kl_z_n`` and ``kl_l_n`` are unweighted per-cell values (shape ``(n,)``);
    ``loss`` is their minibatch mean with the current KL weight on ``kl_z_n``.
    """

    loss: torch.Tensor
    reconstruction_n: torch.Tensor
    kl_z_n: torch.Tensor
    kl_l_n: torch.Tensor

    @property
    def n_obs(self) -> int:
        return int(self.reconstruction_n.shape[0])


@dataclass
class Inference:
    """Output of the encoder pass: posterior parameters, the latent sample and the log library."""

    qz_m: torch.Tensor
    qz_v: torch.Tensor
    z: torch.Tensor
    library: torch.Tensor
    ql_m: torch.Tensor | None = None
    ql_v: torch.Tensor | None = None


@dataclass
class Generative:
    """Output of the decoder pass: the parameters of p(x | z, l)."""

    scale: torch.Tensor
    rate: torch.Tensor
    theta: torch.Tensor | None
    zi_logits: torch.Tensor | None


class VAE(nn.Module):
    """scVI for one device.

    Parameters
    ----------
    n_genes
        Number of genes (read from the data).
    n_batch
        Number of batch categories (read from the data); 1 means no batch covariate.
    config
        Architecture (:class:`ModelConfig`, scvi-tools' defaults).
    library_log_means, library_log_vars
        Per-batch mean and variance of log library sizes, required when the library is latent.

    Notes
    -----
    Submodules are built in scvi-tools' order (``px_r``, ``z_encoder``, ``l_encoder``, ``decoder``) so that a
    given ``torch.manual_seed`` yields scvi-tools' initial weights. Modules this configuration never uses
    (the library encoder with an observed library, the per-cell dispersion head, the dropout head of
    NB/Poisson) are built for that reason and then dropped.
    """

    def __init__(
        self,
        n_genes: int,
        n_batch: int = 1,
        config: ModelConfig | None = None,
        library_log_means: np.ndarray | None = None,
        library_log_vars: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        cfg = config or ModelConfig()
        self.config = cfg
        self.n_genes = n_genes
        self.n_batch = max(int(n_batch), 1)
        if not cfg.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("a latent library needs library_log_means and library_log_vars (per batch)")
            means = torch.as_tensor(np.asarray(library_log_means), dtype=torch.float32).reshape(1, -1)
            var = torch.as_tensor(np.asarray(library_log_vars), dtype=torch.float32).reshape(1, -1)
            if means.shape[1] != self.n_batch or var.shape[1] != self.n_batch:
                raise ValueError(f"library priors must have one entry per batch ({self.n_batch})")
            self.register_buffer("library_log_means", means)
            self.register_buffer("library_log_vars", var)

        if cfg.dispersion == "gene":
            self.px_r = nn.Parameter(torch.randn(n_genes))
        elif cfg.dispersion == "gene-batch":
            self.px_r = nn.Parameter(torch.randn(n_genes, self.n_batch))

        enc_norm = cfg.use_batch_norm in ("both", "encoder"), cfg.use_layer_norm in ("both", "encoder")
        dec_norm = cfg.use_batch_norm in ("both", "decoder"), cfg.use_layer_norm in ("both", "decoder")
        enc_batch = self.n_batch if cfg.encode_covariates else 0
        enc_kw = dict(
            n_batch=enc_batch,
            n_hidden=cfg.n_hidden,
            dropout_rate=cfg.dropout_rate,
            use_batch_norm=enc_norm[0],
            use_layer_norm=enc_norm[1],
            inject_covariates=cfg.deeply_inject_covariates,
        )
        self.z_encoder = Encoder(n_genes, cfg.n_latent, n_layers=cfg.n_layers, **enc_kw)
        l_encoder = Encoder(n_genes, 1, n_layers=1, **enc_kw)
        self.l_encoder = None if cfg.use_observed_lib_size else l_encoder
        self.decoder = Decoder(
            cfg.n_latent,
            n_genes,
            n_batch=self.n_batch,
            n_layers=cfg.n_layers,
            n_hidden=cfg.n_hidden,
            use_batch_norm=dec_norm[0],
            use_layer_norm=dec_norm[1],
            inject_covariates=cfg.deeply_inject_covariates,
            with_dispersion_head=cfg.dispersion == "gene-cell",
            with_dropout_head=cfg.gene_likelihood == "zinb",
        )

    # -- passes -------------------------------------------------------------------------------------------------
    def inference(
        self,
        x_ng: torch.Tensor,
        batch_n: torch.Tensor,
        n_samples: int = 1,
        eps_z: torch.Tensor | None = None,
        eps_l: torch.Tensor | None = None,
    ) -> Inference:
        """Encode counts: ``q(z|x)``, a sample of z and the (observed or sampled) log library.

        With ``n_samples > 1`` the sample axis comes first: ``z`` is ``(s, n, k)``, ``library`` ``(s, n, 1)``.
        ``eps_z`` (``(n, k)``) and ``eps_l`` (``(n, 1)``) supply the standard normal draws of a single sample
        instead of torch's generator (e.g. noise keyed by cell, which does not depend on the minibatch layout).
        """
        library = None
        if self.config.use_observed_lib_size:
            library = torch.log(x_ng.sum(dim=1, keepdim=True))
        x_in = torch.log1p(x_ng) if self.config.log_variational else x_ng
        qz_m, qz_v = self.z_encoder(x_in, batch_n)
        z = self._sample(qz_m, qz_v, eps=eps_z)
        ql_m = ql_v = None
        if self.l_encoder is not None:
            ql_m, ql_v = self.l_encoder(x_in, batch_n)
            library = self._sample(ql_m, ql_v, eps=eps_l)
        if n_samples > 1:  # scvi-tools' order of draws: one z, one library, then S of each
            z = self._sample(qz_m, qz_v, n_samples)
            if ql_m is not None:
                library = self._sample(ql_m, ql_v, n_samples)
            else:
                library = library.expand(n_samples, *library.shape)
        if self.config.latent_distribution == "ln":
            z = torch.softmax(z, dim=-1)
        return Inference(qz_m=qz_m, qz_v=qz_v, z=z, library=library, ql_m=ql_m, ql_v=ql_v)

    @staticmethod
    def _sample(
        mean: torch.Tensor, var: torch.Tensor, n_samples: int = 1, eps: torch.Tensor | None = None
    ) -> torch.Tensor:
        # the same draws as torch.distributions.Normal.rsample (empty().normal_()), so seeds match scvi-tools
        shape = mean.shape if n_samples == 1 else (n_samples, *mean.shape)
        if eps is None:
            eps = torch.empty(shape, dtype=mean.dtype, device=mean.device).normal_()
        return mean + eps * var.sqrt()

    def generative(
        self, z: torch.Tensor, library: torch.Tensor, batch_n: torch.Tensor, transform_batch: int | None = None
    ) -> Generative:
        """Decode a latent sample into the parameters of p(x|z, l); ``transform_batch`` swaps the batch code."""
        if transform_batch is not None:
            batch_n = torch.full_like(batch_n, int(transform_batch))
        scale, rate, r, zi_logits = self.decoder(z, library, batch_n)
        if self.config.dispersion == "gene":
            theta = torch.exp(self.px_r)
        elif self.config.dispersion == "gene-batch":
            theta = torch.exp(self.px_r.t()[batch_n])
        else:
            theta = torch.exp(r)
        if self.config.gene_likelihood == "poisson":
            theta = None
        return Generative(scale=scale, rate=rate, theta=theta, zi_logits=zi_logits)

    def log_likelihood(self, x_ng: torch.Tensor, px: Generative) -> torch.Tensor:
        """Elementwise log p(x | z, l) under the configured likelihood."""
        if self.config.gene_likelihood == "zinb":
            return log_zinb(x_ng, px.rate, px.theta, px.zi_logits)
        if self.config.gene_likelihood == "nb":
            return log_nb(x_ng, px.rate, px.theta)
        return log_poisson(x_ng, px.rate)

    def reconstruction_loss(self, x_ng: torch.Tensor, px: Generative, nonzero: Nonzero | None = None) -> torch.Tensor:
        """Per-cell ``-log p(x | z, l)`` summed over genes; count terms are computed only for non-zero counts."""
        if self.config.gene_likelihood == "zinb":
            return -zinb_rowsum(x_ng, px.rate, px.theta, px.zi_logits, nonzero=nonzero)
        if self.config.gene_likelihood == "nb":
            return -nb_rowsum(x_ng, px.rate, px.theta, nonzero=nonzero)
        return -poisson_rowsum(x_ng, px.rate, nonzero=nonzero)

    def kl_terms(self, inf: Inference, batch_n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-cell ``KL(q(z|x) || N(0, I))`` and ``KL(q(l|x) || p(l))`` (zeros for an observed library)."""
        kl_z = kl_normal(inf.qz_m, inf.qz_v).sum(dim=-1)
        if inf.ql_m is None:
            return kl_z, torch.zeros_like(kl_z)
        prior_m = self.library_log_means[0][batch_n].unsqueeze(-1)
        prior_v = self.library_log_vars[0][batch_n].unsqueeze(-1)
        return kl_z, kl_normal(inf.ql_m, inf.ql_v, prior_m, prior_v).sum(dim=-1)

    def forward(
        self,
        x_ng: torch.Tensor,
        batch_n: torch.Tensor,
        kl_weight: float = 1.0,
        nonzero: Nonzero | None = None,
        eps_z: torch.Tensor | None = None,
        eps_l: torch.Tensor | None = None,
    ) -> LossTerms:
        """One full pass and the loss.

        ``batch_n`` holds ``(n,)`` (or ``(n, 1)``) integer batch codes; ``nonzero`` optionally gives the
        (rows, cols) of the non-zero counts, which a loader reading CSR knows for free; ``eps_z``/``eps_l``
        optionally give the reparameterisation noise (see :meth:`inference`).
        """
        batch_n = batch_n.reshape(-1).long()
        inf = self.inference(x_ng, batch_n, eps_z=eps_z, eps_l=eps_l)
        px = self.generative(inf.z, inf.library, batch_n)
        reconstruction = self.reconstruction_loss(x_ng, px, nonzero)
        kl_z, kl_l = self.kl_terms(inf, batch_n)
        loss = torch.mean(reconstruction + kl_weight * kl_z + kl_l)
        return LossTerms(loss=loss, reconstruction_n=reconstruction, kl_z_n=kl_z, kl_l_n=kl_l)
