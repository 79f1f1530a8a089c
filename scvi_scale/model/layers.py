"""Fully connected blocks, the encoder and the decoder, laid out as scvi-tools lays them out.

Parameter names match scvi-tools' state-dict keys (``fc_layers.Layer 0.0.weight`` ...), so weights move
between the two projects by name. Each hidden layer is a five-slot ``nn.Sequential``: Linear,
BatchNorm (momentum 0.01, eps 1e-3, the original TensorFlow values), LayerNorm (no affine), ReLU,
Dropout; a disabled slot holds ``None`` so that the slot numbers, and therefore the keys, never shift.
"""

from __future__ import annotations

import collections

import torch
import torch.nn.functional as F
from torch import nn

VAR_EPS = 1e-4  # added to exp(var head): keeps the posterior variance away from zero


class FCLayers(nn.Module):
    """A stack of hidden layers with the batch one-hot injected into the first (and, if asked, every) layer.

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    n_batch
        Number of batch categories; 0 or 1 means no batch input (scvi-tools ignores a single category).
    n_layers, n_hidden
        Depth and width of the stack.
    dropout_rate
        Dropout after each layer; 0 leaves the slot empty.
    use_batch_norm, use_layer_norm
        Which normalisation follows each Linear.
    inject_covariates
        Re-inject the batch one-hot before every layer, not only the first.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_batch: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.n_cov = n_batch if n_batch > 1 else 0
        self.inject_covariates = inject_covariates
        dims = [n_in] + (n_layers - 1) * [n_hidden] + [n_out]
        layers = collections.OrderedDict()
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            layers[f"Layer {i}"] = nn.Sequential(
                nn.Linear(d_in + self.n_cov * self._injects(i), d_out),
                nn.BatchNorm1d(d_out, momentum=0.01, eps=0.001) if use_batch_norm else None,
                nn.LayerNorm(d_out, elementwise_affine=False) if use_layer_norm else None,
                nn.ReLU(),
                nn.Dropout(p=dropout_rate) if dropout_rate > 0 else None,
            )
        self.fc_layers = nn.Sequential(layers)

    def _injects(self, i: int) -> bool:
        return i == 0 or self.inject_covariates

    def forward(self, x: torch.Tensor, batch_n: torch.Tensor | None = None) -> torch.Tensor:
        """Apply the stack to ``x`` of shape ``(n, d)`` or ``(s, n, d)``; ``batch_n`` holds integer codes."""
        for i, block in enumerate(self.fc_layers):
            linear, bn, ln, act, drop = block
            if self.n_cov and self._injects(i):
                x = _linear_with_onehot(x, linear, batch_n)
            else:
                x = linear(x)
            if bn is not None:
                x = _batch_norm(bn, x)
            if ln is not None:
                x = ln(x)
            x = act(x)
            if drop is not None:
                x = drop(x)
        return x


def _linear_with_onehot(x: torch.Tensor, linear: nn.Linear, batch_n: torch.Tensor) -> torch.Tensor:
    """``linear(cat([x, onehot(batch)]))`` without building the one-hot: add the batch's weight column.

    Same value as scvi-tools' concatenation (up to float summation order) at a fraction of the cost
    when ``x`` is wide, since the one-hot product is just a column lookup.
    """
    d_in = x.shape[-1]
    w_main, w_cov = linear.weight[:, :d_in], linear.weight[:, d_in:]
    return F.linear(x, w_main, linear.bias) + w_cov.t()[batch_n]


def _batch_norm(bn: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return bn(x)
    if not bn.training:  # running statistics: the sample axis can be folded into the cell axis
        return bn(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    # in training, scvi-tools normalises each Monte-Carlo sample with its own minibatch statistics
    return torch.stack([bn(x_s) for x_s in x])


class Encoder(nn.Module):
    """Maps (log1p) counts to a diagonal Gaussian: ``q_m`` and ``q_v = exp(var head) + 1e-4``."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_batch: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        dropout_rate: float = 0.1,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
    ) -> None:
        super().__init__()
        self.encoder = FCLayers(
            n_in, n_hidden, n_batch, n_layers, n_hidden, dropout_rate, use_batch_norm, use_layer_norm, inject_covariates
        )
        self.mean_encoder = nn.Linear(n_hidden, n_out)
        self.var_encoder = nn.Linear(n_hidden, n_out)

    def forward(self, x: torch.Tensor, batch_n: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the posterior mean and variance, each ``(n, n_out)``."""
        h = self.encoder(x, batch_n)
        return self.mean_encoder(h), torch.exp(self.var_encoder(h)) + VAR_EPS


class Decoder(nn.Module):
    """scVI's decoder: a trunk (no dropout) and heads for the expression scale, dispersion and dropout logits.

    ``px_r_decoder`` (per-cell dispersion) and ``px_dropout_decoder`` (zero-inflation logits) are kept only
    when the likelihood uses them, so DDP never sees parameters without gradients.
    """

    def __init__(
        self,
        n_in: int,
        n_genes: int,
        n_batch: int = 0,
        n_layers: int = 1,
        n_hidden: int = 128,
        use_batch_norm: bool = True,
        use_layer_norm: bool = False,
        inject_covariates: bool = True,
        with_dispersion_head: bool = False,
        with_dropout_head: bool = True,
    ) -> None:
        super().__init__()
        self.px_decoder = FCLayers(
            n_in, n_hidden, n_batch, n_layers, n_hidden, 0.0, use_batch_norm, use_layer_norm, inject_covariates
        )
        self.px_scale_decoder = nn.Sequential(nn.Linear(n_hidden, n_genes), nn.Softmax(dim=-1))
        # built in scvi-tools' order even when unused, so a seed gives scvi-tools' initial weights
        px_r_decoder = nn.Linear(n_hidden, n_genes)
        px_dropout_decoder = nn.Linear(n_hidden, n_genes)
        self.px_r_decoder = px_r_decoder if with_dispersion_head else None
        self.px_dropout_decoder = px_dropout_decoder if with_dropout_head else None

    def forward(
        self, z: torch.Tensor, library: torch.Tensor, batch_n: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Return ``(scale, rate, r, dropout_logits)``; ``rate = exp(library) * scale``."""
        h = self.px_decoder(z, batch_n)
        scale = self.px_scale_decoder(h)
        rate = torch.exp(library) * scale
        r = self.px_r_decoder(h) if self.px_r_decoder is not None else None
        dropout = self.px_dropout_decoder(h) if self.px_dropout_decoder is not None else None
        return scale, rate, r, dropout
