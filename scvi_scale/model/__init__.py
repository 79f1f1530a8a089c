"""The scVI model for one device: distributions, layers, the VAE and its loss.

Tensor names carry their shape, one letter per axis:

- ``n`` cells in the minibatch, ``g`` genes, ``k`` latent dimensions, ``h`` hidden units,
- ``b`` batches (the batch covariate's categories), ``s`` Monte-Carlo samples, ``1`` a singleton axis.

So ``x_ng`` is a minibatch of counts, ``z_nk`` a latent sample, ``library_n1`` the log library size and
``batch_n`` the integer batch codes. This package imports torch and nothing distributed: it never asks
for a rank (DDP wraps it from outside, in ``scvi_scale.dist``).
"""

from __future__ import annotations

from scvi_scale.model.config import ModelConfig
from scvi_scale.model.vae import VAE, LossTerms

__all__ = ["VAE", "LossTerms", "ModelConfig"]
