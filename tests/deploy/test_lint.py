"""YAML, Dockerfile and shell lint of deploy/ (and scripts/): clean as committed, and a planted mistake is caught."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.validators import DEPLOY, REPO, hadolint, plant, shellcheck, yamllint

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
RAYJOB = DEPLOY / "k8s" / "nightly" / "rayjob-rebuild.yaml"
SUBMIT = DEPLOY / "k8s" / "nightly" / "submit.sh"
SHELL_SCRIPTS = sorted([*DEPLOY.rglob("*.sh"), *(REPO / "scripts").glob("*.sh")])


def test_yamllint_passes_every_deploy_yaml():
    assert yamllint(DEPLOY) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("\n  entrypoint:", "\n   entrypoint:", id="bad-indentation"),
        pytest.param("\n  backoffLimit: 1", "\n  backoffLimit: 1\n  backoffLimit: 2", id="duplicated-key"),
        pytest.param('dashboard-host: "0.0.0.0"', 'dashboard-host: "0.0.0.0', id="unclosed-quote"),
        pytest.param("  - key: nvidia.com/gpu", "  - key: nvidia.com/gpu\t", id="tab-and-trailing-space"),
    ],
)
def test_yamllint_rejects_planted_mistake(tmp_path, old, new):
    assert yamllint(plant(RAYJOB, tmp_path, old, new)) != []


def test_hadolint_passes_the_dockerfile():
    assert hadolint(DOCKERFILE) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("\nUSER 1000:100", "\nUSR 1000:100", id="unknown-instruction"),
        pytest.param("pip install --no-cache-dir --index-url", "pip install --index-url", id="pip-cache-DL3042"),
        pytest.param("\nUSER 1000:100", "\nUSER root", id="ends-as-root-DL3002"),
        pytest.param("FROM rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG} AS wheel",
                     "FROM rayproject/ray AS wheel", id="untagged-base-DL3006"),
    ],
)  # fmt: skip
def test_hadolint_rejects_planted_mistake(tmp_path, old, new):
    assert hadolint(plant(DOCKERFILE, tmp_path, old, new)) != []


def test_shell_scripts_found():
    assert SUBMIT in SHELL_SCRIPTS and len(SHELL_SCRIPTS) >= 2


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck_passes(script: Path):
    assert shellcheck(script) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param('if [ "$status" != "$last" ]; then', 'if [[ "$status" != "$last" ]]; then', id="bashism-in-sh"),
        pytest.param('kc create -f "$manifest" -o name', "kc create -f $manifest -o name", id="unquoted-variable"),
        pytest.param("                exit 0\n            fi\n", "                exit 0\n", id="missing-fi"),
    ],
)
def test_shellcheck_rejects_planted_mistake(tmp_path, old, new):
    assert shellcheck(plant(SUBMIT, tmp_path, old, new)) != []
