"""Batch surgery: an extended model gives the old model's outputs for cells of old batches, whatever the order."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from scvi_scale.model import VAE, ModelConfig
from scvi_scale.model.surgery import extend_batches, transfer_weights

N_GENES = 30


def _trained_like(cfg: ModelConfig, n_batch: int, seed: int = 0) -> VAE:
    """A model with non-trivial weights everywhere (BatchNorm statistics included), in eval mode."""
    torch.manual_seed(seed)
    lib = (None, None) if cfg.use_observed_lib_size else (np.linspace(5, 7, n_batch), np.linspace(0.2, 0.5, n_batch))
    model = VAE(N_GENES, n_batch, cfg, *lib)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn_like(b))
            elif name.endswith("running_var"):
                b.copy_(1.0 + torch.rand_like(b))
    return model.eval()


def _outputs(model: VAE, x: torch.Tensor, batch: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        inf = model.inference(x, batch)
        px = model.generative(inf.qz_m, torch.log(x.sum(1, keepdim=True)), batch)
        out = [inf.qz_m, inf.qz_v, px.scale, px.rate]
        out += [t for t in (px.theta, px.zi_logits, inf.ql_m) if t is not None]
        return out


CONFIGS = {
    "default": ModelConfig(n_hidden=16, n_latent=4),
    "deep-encode-genebatch-latentlib": ModelConfig(
        n_hidden=16,
        n_latent=4,
        n_layers=2,
        encode_covariates=True,
        dispersion="gene-batch",
        use_observed_lib_size=False,
    ),
    "nb-shallow-inject": ModelConfig(
        n_hidden=8, n_latent=3, n_layers=2, gene_likelihood="nb", deeply_inject_covariates=False
    ),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_old_batches_give_identical_outputs(name: str) -> None:
    cfg = CONFIGS[name]
    old_cats = ["b0", "b1", "b2"]
    model = _trained_like(cfg, len(old_cats))
    new_cats = ["b2", "new_a", "b0", "b1", "new_b"]  # reordered, with two new batches in between
    big = extend_batches(model, old_cats, new_cats)
    assert big.n_batch == 5 and not big.training
    torch.manual_seed(1)
    x = torch.poisson(torch.full((40, N_GENES), 3.0)) + 1
    old_codes = torch.randint(0, 3, (40,))
    remap = torch.tensor([new_cats.index(c) for c in old_cats])
    torch.manual_seed(2)
    before = _outputs(model, x, old_codes)
    torch.manual_seed(2)
    after = _outputs(big, x, remap[old_codes])
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    if not cfg.use_observed_lib_size:  # old priors kept, new ones start at the mean
        torch.testing.assert_close(big.library_log_means[0, remap], model.library_log_means[0])
    # a new batch behaves like the average batch: the decoder's column is the mean of the old ones
    w_old = model.decoder.px_decoder.fc_layers[0][0].weight
    w_new = big.decoder.px_decoder.fc_layers[0][0].weight
    torch.testing.assert_close(w_new[:, cfg.n_latent + 1], w_old[:, cfg.n_latent :].mean(1))


def test_from_a_model_without_batches() -> None:
    """One batch has no covariate columns; its extension has them, zero for the old batch."""
    cfg = CONFIGS["default"]
    model = _trained_like(cfg, 1)
    big = extend_batches(model, ["0"], ["0", "night2"], new_columns="zeros")
    x = torch.poisson(torch.full((10, N_GENES), 2.0)) + 1
    zero = torch.zeros(10, dtype=torch.long)
    for a, b in zip(_outputs(model, x, zero), _outputs(big, x, zero), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_transfer_keeps_target_priors_and_checks_architecture() -> None:
    cfg = dataclasses.replace(CONFIGS["default"], use_observed_lib_size=False)
    model = _trained_like(cfg, 2)
    target = VAE(N_GENES, 3, cfg, np.array([1.0, 2.0, 3.0]), np.array([0.1, 0.2, 0.3]))
    transfer_weights(model, ["a", "b"], target, ["a", "b", "c"])
    torch.testing.assert_close(target.library_log_means[0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(target.z_encoder.mean_encoder.weight, model.z_encoder.mean_encoder.weight)
    other = VAE(N_GENES, 3, dataclasses.replace(cfg, n_hidden=8), np.zeros(3), np.ones(3))
    with pytest.raises(ValueError, match="same genes and architecture"):
        transfer_weights(model, ["a", "b"], other, ["a", "b", "c"])
    with pytest.raises(ValueError, match="category names"):
        transfer_weights(model, ["a"], target, ["a", "b", "c"])
