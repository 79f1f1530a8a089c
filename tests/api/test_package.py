"""``import scvi_scale as ss``: the public names, imported on first use; the import itself stays light."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import scvi_scale as ss

API = ["open_store", "open_counts", "convert", "append", "prepare", "train", "resume", "load_run", "embed",
       "embed_to_store", "read_embedding", "evaluate", "import_scvi_tools", "export_scvi_tools", "Config",
       "load_config", "plot_losses", "plot_embedding", "report", "rebuild", "normalized_expression",
       "differential_expression", "posterior_predictive_sample", "Run", "TrainingInterrupted"]  # fmt: skip


def test_the_api_is_listed():
    assert set(API) <= set(ss.__all__) and set(API) <= set(dir(ss))
    assert "importlib" not in dir(ss)  # the package's own imports are not part of it
    for name in ("open_store", "convert", "prepare", "train", "resume", "embed", "evaluate", "load_config"):
        assert callable(getattr(ss, name)), name
        doc = getattr(ss, name).__doc__
        assert doc and "Examples" in doc or name == "load_config", name


def test_names_shared_with_subpackages_are_the_functions_and_still_reach_them():
    assert "source" in inspect.signature(ss.train).parameters
    assert ss.train.__doc__.startswith("Train scVI")
    import scvi_scale.train.loop as loop  # the subpackage of the training loop, through the same name

    assert loop.TrainingInterrupted is ss.TrainingInterrupted and ss.train.loop is loop
    from scvi_scale.report import plots

    assert ss.report.plots is plots and callable(ss.report)


def test_import_is_light_and_api_access_imports_no_optional_backend():
    code = """
import json, sys
import scvi_scale as ss
light = sorted(m for m in ("torch", "ray", "tiledb", "anndata", "zarr", "scvi_scale.api") if m in sys.modules)
ss.train, ss.embed, ss.Config, ss.open_store, ss.plot_embedding
after = sorted(m for m in ("ray", "tiledb", "scvi", "lightning", "boto3", "s3fs") if m in sys.modules)
print(json.dumps([light, after, "torch" in sys.modules]))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    light, after, torch_loaded = json.loads(proc.stdout)
    assert light == [] and after == [] and torch_loaded
