"""The fused (optionally compiled) ZINB kernel: same values and gradients as the plain formula."""

from __future__ import annotations

import pytest
import torch

from scvi_scale.model.distributions import log_zinb, zinb_rowsum
from scvi_scale.model.fused import compile_kernels, kernels_compiled


def _inputs(per_gene_theta: bool):
    g = torch.Generator().manual_seed(0)
    n, genes = 48, 150
    x = (torch.rand(n, genes, generator=g) < 0.15).float() * torch.poisson(torch.full((n, genes), 4.0), generator=g)
    mu = (torch.rand(n, genes, generator=g) * 5).requires_grad_()
    shape = (genes,) if per_gene_theta else (n, genes)
    theta = (torch.rand(*shape, generator=g) * 3 + 0.01).requires_grad_()
    pi = (torch.randn(n, genes, generator=g) * 5).requires_grad_()
    return x, mu, theta, pi, torch.randn(n, generator=g)


@pytest.mark.slow
@pytest.mark.parametrize("per_gene_theta", [True, False])
def test_compiled_kernel_matches_formula(per_gene_theta):
    x, mu, theta, pi, w = _inputs(per_gene_theta)
    ref = (log_zinb(x, mu, theta, pi).sum(-1) * w).sum()
    ref_grads = torch.autograd.grad(ref, [mu, theta, pi])
    try:
        assert compile_kernels(True) and kernels_compiled()
        got = (zinb_rowsum(x, mu, theta, pi) * w).sum()
        grads = torch.autograd.grad(got, [mu, theta, pi])
    finally:
        compile_kernels(False)
    assert not kernels_compiled()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=0)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
