"""Partition-invariant reparameterisation noise: the standard normal draw for cell ``i`` in epoch ``e`` is a pure
function of ``(seed, e, i, latent dimension)``.

With torch's global generator, the noise a cell gets depends on where in a minibatch it lands and on which rank
trains it. Keyed noise does not, so a data-parallel run equals one process fed the same global minibatches
(the test of that property needs it), and a resume on another number of workers draws the same noise. A
single process keeps torch's generator by default, whose draws match scvi-tools' for the same seed.

The draw is a counter-based hash (SplitMix64 finaliser on a 64-bit key) turned into two uniforms and one
normal by Box-Muller; it runs vectorised on the minibatch's device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["cell_normal"]

_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15 as a signed 64-bit integer
_M1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M2 = -7723592293110705685  # 0x94D049BB133111EB


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts signed integers arithmetically)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x * _GOLDEN  # int64 products wrap modulo 2**64
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def _uniform(key: torch.Tensor) -> torch.Tensor:
    """Uniform on (0, 1] from the top 53 bits of the mixed key, float64."""
    return (_shr(_mix(key), 11).to(torch.float64) + 1.0) / float(1 << 53)


def cell_normal(
    seed: int, epoch: int, rows_n: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Standard normal noise of shape ``(len(rows_n), dim)``, fixed by ``(seed, epoch, row, column)``.

    Parameters
    ----------
    seed, epoch
        The run's seed and the epoch (each cell is drawn once per epoch).
    rows_n
        Global row index of every cell of the minibatch (int64 tensor; its device is the output's).
    dim
        Columns (latent dimensions).
    """
    rows = rows_n.to(torch.int64).reshape(-1, 1)
    cols = torch.arange(dim, dtype=torch.int64, device=rows.device).reshape(1, -1)
    base = _mix(torch.tensor(seed, dtype=torch.int64) * 1_000_003 + epoch).to(rows.device)
    key = _mix(base ^ _mix(rows)) + cols * 2
    u1, u2 = _uniform(key), _uniform(key + 1)
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return z.to(dtype)
