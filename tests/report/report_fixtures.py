"""A small trained run shared by the report tests (600 cells x 200 genes, 3 batches, 4 cell types).

Bound in each test module (``trained_run = report_fixtures.trained_run``) rather than kept in a
``conftest.py``; trained once per session whichever module asks first.
"""

from __future__ import annotations

import pytest

_RUNS: dict[str, object] = {}


@pytest.fixture(scope="session")
def trained_run(small_atlas, tmp_path_factory):
    if "run" not in _RUNS:
        from scvi_scale import api

        out = tmp_path_factory.mktemp("report_run") / "run"
        train = {"max_epochs": 8, "n_epochs_kl_warmup": 4, "progress": False, "seed": 0}
        _RUNS["run"] = api.train(small_atlas, out, data={"batch_key": "batch"}, train=train)
    return _RUNS["run"]
