"""Parity tests for scvi_scale.model.scvi_tools_io against scvi-tools 1.4.2's own save and load."""

from __future__ import annotations

import os
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch

from scvi_scale.model.scvi_tools_io import (
    ScviToolsModel,
    UnsafePickleError,
    missing_unused_keys,
    read_scvi_tools,
    unused_prefixes,
    write_scvi_tools,
)

scvi = pytest.importorskip("scvi")
anndata = pytest.importorskip("anndata")

pytestmark = [
    pytest.mark.parity,
    # Lightning's fit loop builds a torch `LeafSpec`, which torch deprecates with a FutureWarning; pyproject
    # only filters lightning's DeprecationWarning and UserWarning. Third-party noise, not ours.
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

CONFIGS = {
    "default": ({}, {}),
    "nb-genebatch-2layers-latentlib": (
        {"batch_key": "batch"},
        {"gene_likelihood": "nb", "dispersion": "gene-batch", "n_layers": 2, "use_observed_lib_size": False},
    ),
    "poisson-genecell-encodecov-layer-labels": (
        {"batch_key": "batch", "layer": "counts", "labels_key": "cell_type"},
        {"gene_likelihood": "poisson", "dispersion": "gene-cell", "encode_covariates": True, "n_hidden": 32},
    ),
}


def make_adata(seed: int = 0):
    rng = np.random.default_rng(seed)
    counts = rng.poisson(3.0, size=(200, 50)).astype(np.float32)
    adata = anndata.AnnData(counts)
    adata.layers["counts"] = counts.copy()
    adata.var_names = [f"gene{i}" for i in range(50)]
    adata.obs_names = [f"cell{i}" for i in range(200)]
    adata.obs["batch"] = rng.choice(["b0", "b1", "b2"], size=200)
    adata.obs["cell_type"] = rng.choice(["T", "B"], size=200)
    return adata


@pytest.fixture(scope="module", params=list(CONFIGS))
def saved(request, tmp_path_factory):
    """A 1-epoch SCVI per configuration, saved by scvi-tools itself."""
    setup_kwargs, model_kwargs = CONFIGS[request.param]
    scvi.settings.seed = 0
    adata = make_adata()
    scvi.model.SCVI.setup_anndata(adata, **setup_kwargs)
    model = scvi.model.SCVI(adata, **model_kwargs)
    model.train(max_epochs=1, accelerator="cpu", enable_progress_bar=False)
    path = tmp_path_factory.mktemp(request.param) / "scvi"
    model.save(str(path))
    return model, path, setup_kwargs


def without_unused(model: ScviToolsModel) -> ScviToolsModel:
    """What our own model holds: scvi-tools' state dict minus the modules never called."""
    prefixes = unused_prefixes(model.model_kwargs)
    return replace(model, state_dict={k: v for k, v in model.state_dict.items() if not k.startswith(prefixes)})


def test_read_gives_the_module_state_dict(saved):
    model, path, setup_kwargs = saved
    ours = read_scvi_tools(path)
    theirs = model.module.state_dict()
    assert list(ours.state_dict) == list(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours.state_dict[key], tensor.cpu()), key
    assert ours.var_names == list(model.adata.var_names)
    assert ours.batch_key == setup_kwargs.get("batch_key")
    assert ours.layer == setup_kwargs.get("layer")
    assert ours.batch_categories == (["b0", "b1", "b2"] if ours.batch_key else [])
    assert ours.label_categories == (["B", "T"] if ours.labels_key else [])
    for name, value in model.init_params_["non_kwargs"].items():
        assert ours.model_kwargs[name] == value


def test_written_model_loads_in_scvi_tools_with_the_same_latent(saved, tmp_path):
    model, path, setup_kwargs = saved
    ours = without_unused(read_scvi_tools(path))
    out = write_scvi_tools(tmp_path / "export", ours)
    adata = make_adata()
    loaded = scvi.model.SCVI.load(str(out), adata=adata, accelerator="cpu")
    assert loaded.is_trained
    loaded_state = loaded.module.state_dict()
    for key, tensor in ours.state_dict.items():
        assert torch.equal(loaded_state[key], tensor), key
    np.testing.assert_array_equal(loaded.get_latent_representation(), model.get_latent_representation())


def test_round_trip_preserves_used_tensors_and_fills_deterministically(saved, tmp_path):
    _, path, _ = saved
    ours = without_unused(read_scvi_tools(path))
    first = read_scvi_tools(write_scvi_tools(tmp_path / "a", ours))
    second = read_scvi_tools(write_scvi_tools(tmp_path / "b", first))
    for key, tensor in ours.state_dict.items():
        assert torch.equal(first.state_dict[key], tensor), key
    assert first.state_dict.keys() == second.state_dict.keys()
    for key, tensor in first.state_dict.items():
        assert torch.equal(second.state_dict[key], tensor), key
    assert (first.model_kwargs, first.batch_categories, first.layer) == (
        ours.model_kwargs,
        ours.batch_categories,
        ours.layer,
    )


def test_missing_unused_keys_are_default_initialised():
    kwargs = {"use_observed_lib_size": True, "gene_likelihood": "nb", "n_hidden": 16}
    filled = missing_unused_keys(kwargs, n_genes=7, n_batch=3)
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in filled} == {
        "l_encoder.encoder",
        "l_encoder.mean_encoder",
        "l_encoder.var_encoder",
        "decoder.px_r_decoder",
        "decoder.px_dropout_decoder",
    }
    bn = "l_encoder.encoder.fc_layers.Layer 0.1"
    assert torch.equal(filled[f"{bn}.weight"], torch.ones(16))
    assert torch.equal(filled[f"{bn}.running_mean"], torch.zeros(16))
    assert torch.equal(filled[f"{bn}.running_var"], torch.ones(16))
    assert filled[f"{bn}.num_batches_tracked"].dtype == torch.long
    weight = filled["decoder.px_dropout_decoder.weight"]
    assert weight.shape == (7, 16) and weight.abs().max() <= 1 / 4 and weight.std() > 0
    again = missing_unused_keys(kwargs, n_genes=7, n_batch=3)
    assert all(torch.equal(filled[k], again[k]) for k in filled)


@pytest.mark.parametrize(
    ("setup_kwargs", "model_kwargs", "message"),
    [
        ({}, {"dispersion": "gene-label"}, "dispersion='gene-label'"),
        ({}, {"gene_likelihood": "normal"}, "gene_likelihood='normal'"),
        ({"batch_key": "batch"}, {"batch_representation": "embedding"}, "batch_representation='embedding'"),
        ({"categorical_covariate_keys": ["cov"]}, {}, "categorical_covariate_keys"),
    ],
)
def test_unsupported_models_are_refused(tmp_path, setup_kwargs, model_kwargs, message):
    adata = make_adata()
    adata.obs["cov"] = adata.obs["batch"].to_numpy()
    scvi.model.SCVI.setup_anndata(adata, **setup_kwargs)
    scvi.model.SCVI(adata, n_hidden=8, **model_kwargs).save(str(tmp_path / "m"))
    with pytest.raises(ValueError, match=message):
        read_scvi_tools(tmp_path / "m")


class _Payload:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    (tmp_path / "m").mkdir()
    torch.save(
        {"model_state_dict": _Payload(f"touch {marker}"), "var_names": [], "attr_dict": {}}, tmp_path / "m" / "model.pt"
    )
    with pytest.raises(UnsafePickleError, match="system"):
        read_scvi_tools(tmp_path / "m")
    assert not marker.exists()


def test_write_refuses_a_state_dict_missing_a_used_key(saved, tmp_path):
    _, path, _ = saved
    ours = read_scvi_tools(path)
    del ours.state_dict["decoder.px_scale_decoder.0.weight"]
    with pytest.raises(ValueError, match="px_scale_decoder"):
        write_scvi_tools(tmp_path / "export", ours)
    assert not (tmp_path / "export").exists()


def test_write_refuses_an_existing_directory_unless_overwrite(saved, tmp_path):
    _, path, _ = saved
    ours = without_unused(read_scvi_tools(path))
    target = tmp_path / "export"
    write_scvi_tools(target, ours)
    (target / "notes.txt").write_text("kept")
    with pytest.raises(FileExistsError):
        write_scvi_tools(target, ours)
    write_scvi_tools(target, ours, overwrite=True)
    assert (target / "notes.txt").read_text() == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary leftovers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_scvi_tools(target)
