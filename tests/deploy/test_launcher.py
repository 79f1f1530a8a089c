"""Ray cluster-launcher YAMLs, checked as `ray up` checks them (Ray's schema after its defaults are filled in).

``ray up`` has no dry run, and ``prepare_config``/``validate_config`` live in ``ray.autoscaler._private``: the
pinned Ray keeps them where this test finds them; a Ray upgrade that moves them fails here, on purpose.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from tests.deploy.validators import DEPLOY, load_docs, plant, validate_launcher

pytest.importorskip("ray.autoscaler._private.util", reason="the launcher check needs ray (the dev extra)")

LAUNCHER = sorted((DEPLOY / "launcher").glob("*.yaml"))


def test_both_clouds_have_a_launcher_config():
    assert [p.name for p in LAUNCHER] == ["aws-gpu.yaml", "gcp-gpu.yaml"]


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_config_passes_rays_validation(path: Path):
    assert validate_launcher(load_docs(path)[0]) == []


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("    min_workers: 0", "    min_workrs: 0", id="misspelled-node-type-key"),
        pytest.param("head_node_type: head", "head_node_typ: head", id="misspelled-top-level-key"),
        pytest.param("head_node_type: head", "head_node_type: headnode", id="head-type-not-defined"),
        pytest.param("  container_name:", "  containr_name:", id="misspelled-docker-key"),
        pytest.param("max_workers: 4\nupscaling", "max_workers: four\nupscaling", id="max-workers-wrong-type"),
        pytest.param("  ssh_user: ubuntu", "  ssh_usr: ubuntu", id="misspelled-auth-key"),
        pytest.param("    min_workers: 0", "    min_workers: 9", id="min-workers-above-max"),
    ],
)
def test_launcher_validation_rejects_planted_mistake(tmp_path, path, old, new):
    assert validate_launcher(load_docs(plant(path, tmp_path, old, new))[0]) != []


def test_launcher_config_without_resources_is_rejected():
    config = copy.deepcopy(load_docs(LAUNCHER[0])[0])
    del config["available_node_types"]["gpu"]["resources"]
    assert validate_launcher(config) != []
