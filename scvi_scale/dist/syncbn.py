"""Batch normalisation over the global minibatch on CPU (gloo), where torch's ``SyncBatchNorm`` refuses to run.

In training mode each rank sums its cells' values and squares per feature; one differentiable all-reduce
(:func:`torch.distributed.nn.functional.all_reduce`) gives every rank the global count, mean and biased
variance, which normalise the local cells. The backward pass all-reduces the gradients of those sums, so
each rank's gradient includes how its cells moved the global statistics, exactly as one process computing
batch norm over the concatenated batch would. Running statistics use the unbiased global variance, like
``nn.BatchNorm1d``. In eval mode this is plain ``BatchNorm1d``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["GlobalBatchNorm1d", "convert_global_batchnorm"]


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics cover every rank's rows (same parameters and buffers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not dist.is_initialized() or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce

        n_local = torch.full((1,), float(x.shape[0]), dtype=x.dtype, device=x.device)
        packed = all_reduce(torch.cat([x.sum(0), (x * x).sum(0), n_local]))
        c = x.shape[1]
        n = packed[-1]
        mean = packed[:c] / n
        var = (packed[c : 2 * c] / n - mean * mean).clamp_min(0.0)  # biased, as batch norm normalises
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 0.1
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                unbiased = var.detach() * (n.detach() / (n.detach() - 1).clamp_min(1.0))
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
                self.num_batches_tracked.add_(1)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


def convert_global_batchnorm(module: nn.Module) -> nn.Module:
    """Swap every ``nn.BatchNorm1d`` in ``module`` (in place) for a :class:`GlobalBatchNorm1d` sharing its
    parameters and buffers; returns ``module``."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            new = GlobalBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            new.weight, new.bias = child.weight, child.bias
            new.running_mean, new.running_var = child.running_mean, child.running_var
            new.num_batches_tracked = child.num_batches_tracked
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_global_batchnorm(child)
    return module
