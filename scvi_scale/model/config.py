"""The model's hyperparameters: one frozen dataclass with scvi-tools' SCVI defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Dispersion = Literal["gene", "gene-batch", "gene-cell"]
Likelihood = Literal["zinb", "nb", "poisson"]
NormPlace = Literal["both", "encoder", "decoder", "none"]

DISPERSIONS = ("gene", "gene-batch", "gene-cell")
LIKELIHOODS = ("zinb", "nb", "poisson")
NORM_PLACES = ("both", "encoder", "decoder", "none")
LATENT_DISTRIBUTIONS = ("normal", "ln")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the scVI VAE; every default is scvi-tools' ``SCVI`` default.

    Sizes that come from the data (number of genes, number of batches) are not here: they are read
    from the data and passed to :class:`~scvi_scale.model.VAE` separately.
    """

    n_hidden: int = 128
    n_latent: int = 10
    n_layers: int = 1
    dropout_rate: float = 0.1
    dispersion: Dispersion = "gene"
    gene_likelihood: Likelihood = "zinb"
    latent_distribution: str = "normal"
    use_observed_lib_size: bool = True
    encode_covariates: bool = False
    deeply_inject_covariates: bool = True
    use_batch_norm: NormPlace = "both"
    use_layer_norm: NormPlace = "none"
    log_variational: bool = True

    def __post_init__(self) -> None:
        checks = [
            ("dispersion", self.dispersion, DISPERSIONS),
            ("gene_likelihood", self.gene_likelihood, LIKELIHOODS),
            ("use_batch_norm", self.use_batch_norm, NORM_PLACES),
            ("use_layer_norm", self.use_layer_norm, NORM_PLACES),
            ("latent_distribution", self.latent_distribution, LATENT_DISTRIBUTIONS),
        ]
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"model.{name} must be one of {', '.join(allowed)}; got {value!r}")
        for name in ("n_hidden", "n_latent", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1; got {getattr(self, name)}")
        if not 0.0 <= self.dropout_rate < 1.0:
            raise ValueError(f"model.dropout_rate must be in [0, 1); got {self.dropout_rate}")
