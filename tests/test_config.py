"""The config tree: YAML + dotted overrides, typed, unknown keys rejected."""

from __future__ import annotations

import pytest

from scvi_scale.config import Config, ConfigError, config_from_dict, load_config, with_overrides


def test_defaults_are_scvi_tools_defaults():
    c = Config()
    assert (c.model.n_hidden, c.model.n_latent, c.model.n_layers) == (128, 10, 1)
    assert c.model.gene_likelihood == "zinb" and c.model.dispersion == "gene"
    assert c.model.use_observed_lib_size and not c.model.encode_covariates
    assert (c.train.lr, c.train.eps, c.train.weight_decay, c.train.n_epochs_kl_warmup) == (1e-3, 0.01, 1e-6, 400)
    assert (c.data.batch_size, c.data.train_size) == (128, 0.9)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  n_latent: 20\n  gene_likelihood: nb\ntrain:\n  max_epochs: 3\n")
    c = load_config(f, ["train.max_epochs=7", "model.use_batch_norm=none", "train.n_epochs_kl_warmup=null"])
    assert c.model.n_latent == 20 and c.model.gene_likelihood == "nb"
    assert c.train.max_epochs == 7 and c.train.n_epochs_kl_warmup is None
    assert c.model.use_batch_norm == "none"
    assert config_from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.bogus=1", "unknown key train.bogus"),
        ("nosection.x=1", "unknown key nosection"),
        ("model.gene_likelihood=gaussian", "must be one of zinb, nb, poisson"),
        ("train.max_epochs=many", "train.max_epochs must be an integer"),
        ("train.lr=fast", "train.lr must be a number"),
        ("model.n_latent=0", "n_latent must be >= 1"),
        ("data.batch_size=1", "batch_size must be >= 2"),
        ("model.encode_covariates=maybe", "must be true or false"),
        ("train.max_epochs", "section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("- a list\n- not a mapping\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_with_overrides_keeps_other_fields():
    base = load_config(None, ["model.n_latent=5", "train.seed=3"])
    c = with_overrides(base, model={"n_hidden": 64})
    assert (c.model.n_latent, c.model.n_hidden, c.train.seed) == (5, 64, 3)
