"""Distributed training: the only package that touches ``torch.distributed`` or ``ray``.

- :mod:`~scvi_scale.dist.context`: :class:`DistContext` (rank, world size, device; process-group set-up and
  tear-down, barrier, sums across ranks, rank-0 helpers). A single process gets a context whose methods do
  nothing, so the training loop has one code path.
- :mod:`~scvi_scale.dist.syncbn`: batch normalisation over the global minibatch (all ranks together), so
  data-parallel training equals one process fed the same global batches.
- :func:`~scvi_scale.dist.context.wrap_model`: the DDP wrap (the model itself stays single-device).
"""

from __future__ import annotations

from scvi_scale.dist.context import DistContext, wrap_model

__all__ = ["DistContext", "wrap_model"]
