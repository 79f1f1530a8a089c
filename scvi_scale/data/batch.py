"""The minibatch contract between loaders and the training loop."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Batch:
    """One minibatch.

    Attributes
    ----------
    x_ng
        Raw counts, dense float32 ``(n, g)``.
    batch_n
        Integer batch codes ``(n,)``, int64.
    rows_n
        Row numbers of these cells in their store, so outputs can be written back in place.
    nonzero
        Optional (row, col) int64 tensors of exactly the non-zero entries of ``x_ng``; the model skips
        zero counts in the likelihood with it (see ``model.distributions``).
    """

    x_ng: torch.Tensor
    batch_n: torch.Tensor
    rows_n: np.ndarray
    nonzero: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_obs(self) -> int:
        return int(self.x_ng.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        nz = None
        if self.nonzero is not None:
            nz = (
                self.nonzero[0].to(device, non_blocking=non_blocking),
                self.nonzero[1].to(device, non_blocking=non_blocking),
            )
        return Batch(
            self.x_ng.to(device, non_blocking=non_blocking),
            self.batch_n.to(device, non_blocking=non_blocking),
            self.rows_n,
            nz,
        )
