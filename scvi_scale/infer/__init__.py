"""Per-cell outputs of a trained model: latent embeddings and ELBO evaluation."""

from __future__ import annotations

from scvi_scale.infer.embed import latent_representation

__all__ = ["latent_representation"]
