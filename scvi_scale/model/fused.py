"""Hand-fused kernels for the hot spots of a training step, with their gradients written out.

The ZINB zero branch summed over genes, ``sum_g softplus(a) - softplus(-pi)`` with
``a = theta (log theta - log(theta + mu)) - pi``, touches every (cell, gene) entry; autograd would keep a
dozen (n, g) intermediates and replay them backwards. Here forward and backward are two plain functions of
tensors, which ``torch.compile`` can fuse into one loop each (``compile_kernels``); without compilation
they still save about a third of the passes.

Gradients, with ``s = sigmoid(a)``, ``q = theta / (theta + mu + eps)`` and an upstream ``g_n`` per cell:
``d/dpi = g (sigmoid(-pi) - s)``, ``d/dmu = -g s q``,
``d/dtheta = g s (log(theta + eps) - log(theta + mu + eps) + theta / (theta + eps) - q)`` (summed over cells
for a per-gene theta).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _zero_branch_fwd(mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor, eps: float):
    log_theta_mu = torch.log(theta + mu + eps)
    a = theta * (torch.log(theta + eps) - log_theta_mu) - pi
    out = (F.softplus(a) - F.softplus(-pi)).sum(dim=-1)
    return out, a


def _zero_branch_bwd(
    g: torch.Tensor,
    mu: torch.Tensor,
    theta: torch.Tensor,
    pi: torch.Tensor,
    a: torch.Tensor,
    eps: float,
    per_gene_theta: bool,
):
    g = g.unsqueeze(-1)
    s = torch.sigmoid(a)
    theta_mu = theta + mu + eps
    q = theta / theta_mu
    d_pi = g * (torch.sigmoid(-pi) - s)
    d_mu = -(g * s) * q
    d_theta = (g * s) * (torch.log(theta + eps) - torch.log(theta_mu) + theta / (theta + eps) - q)
    if per_gene_theta:
        d_theta = d_theta.sum(dim=0)
    return d_mu, d_theta, d_pi


_KERNELS = {"fwd": _zero_branch_fwd, "bwd": _zero_branch_bwd}
_COMPILED: dict[str, object] = {}


def compile_kernels(enabled: bool = True) -> bool:
    """Use ``torch.compile``d versions of the kernels (needs a C++ compiler on CPU); returns whether it is on.

    Compilation happens on first use and costs seconds, so it pays off on long runs. If it fails, the eager
    kernels stay in use and a warning says why.
    """
    if not enabled:
        _KERNELS.update(fwd=_zero_branch_fwd, bwd=_zero_branch_bwd)
        return False
    try:
        if not _COMPILED:
            _COMPILED["fwd"] = torch.compile(_zero_branch_fwd, dynamic=True, fullgraph=True)
            _COMPILED["bwd"] = torch.compile(_zero_branch_bwd, dynamic=True, fullgraph=True)
        _KERNELS.update(_COMPILED)
    except Exception as err:  # no compiler, unsupported platform: stay correct, just slower
        log.warning("torch.compile unavailable (%s); using eager kernels", err)
        return False
    return True


def kernels_compiled() -> bool:
    return _KERNELS["fwd"] is not _zero_branch_fwd


class ZinbZeroBranchSum(torch.autograd.Function):
    """Per-cell ``sum_g softplus(a) - softplus(-pi)`` (the ZINB log-probability of a zero, for every entry)."""

    @staticmethod
    def forward(ctx, mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor, eps: float) -> torch.Tensor:
        out, a = _run("fwd", mu, theta, pi, eps)
        ctx.save_for_backward(mu, theta, pi, a)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        mu, theta, pi, a = ctx.saved_tensors
        d_mu, d_theta, d_pi = _run("bwd", g, mu, theta, pi, a, ctx.eps, theta.dim() == 1)
        return d_mu, d_theta, d_pi, None


def _run(name: str, *args):
    try:
        return _KERNELS[name](*args)
    except Exception as err:
        if not kernels_compiled():
            raise
        log.warning("compiled kernel failed (%s); falling back to eager kernels", str(err).splitlines()[0][:200])
        compile_kernels(False)
        return _KERNELS[name](*args)


def zinb_zero_branch_sum(mu: torch.Tensor, theta: torch.Tensor, pi: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-cell sum over genes of the ZINB zero branch, with the fused gradient above."""
    return ZinbZeroBranchSum.apply(mu, theta, pi, eps)
