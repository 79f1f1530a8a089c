"""Fixtures for the deploy checks: KubeRay's CRD schemas (from ../shared), the project's Ray pin and image."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.deploy.invariants import expected_image_tag, pinned
from tests.deploy.validators import CRD_FILES, DEPLOY, KUBERAY_SCHEMAS, load_docs

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"


@pytest.fixture(scope="session")
def kuberay() -> Path:
    """The KubeRay CRD folder; the CRD checks are skipped, saying why, where ../shared is not laid out."""
    missing = [name for name in CRD_FILES.values() if not (KUBERAY_SCHEMAS / name).is_file()]
    if missing:
        pytest.skip(f"KubeRay CRD schemas not found in {KUBERAY_SCHEMAS} ({', '.join(missing)}): ../shared is missing")
    return KUBERAY_SCHEMAS


@pytest.fixture(scope="session")
def ray_pin() -> str:
    return pinned("ray")


@pytest.fixture(scope="session")
def image() -> str:
    """The one image every manifest runs: any registry, with the tag that the Dockerfile's pins give.

    Taken from the nightly RayJob; the other manifests and the launcher configs must name the same one.
    """
    (rayjob,) = load_docs(DEPLOY / "k8s" / "nightly" / "rayjob-rebuild.yaml")
    found = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]
    repository, _, tag = found.rpartition(":")
    assert repository.endswith("/scvi-scale") and tag == expected_image_tag(DOCKERFILE), (
        f"image {found!r}: expected REGISTRY/scvi-scale:{expected_image_tag(DOCKERFILE)}"
    )
    return found


@pytest.fixture(scope="session")
def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl is not installed: `kubectl kustomize` cannot render deploy/k8s/nightly")
    return found
