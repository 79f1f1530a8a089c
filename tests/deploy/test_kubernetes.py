"""Kubernetes manifests: core kinds against Kubernetes' own schemas, RayJob/RayCluster against KubeRay's CRDs.

No cluster is needed: kubernetes-validate carries the OpenAPI schemas of each Kubernetes release, KubeRay's CRD
YAMLs carry theirs (../shared/schemas), and `kubectl kustomize` renders the nightly folder offline.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.deploy.invariants import deploy_yaml_files
from tests.deploy.validators import (
    DEPLOY,
    REPO,
    kustomize_build,
    load_docs,
    plant,
    validate_k8s_doc,
    validate_k8s_file,
)

K8S = DEPLOY / "k8s"
NIGHTLY = K8S / "nightly"
NOT_MANIFESTS = {"kustomization.yaml", "atlas.yaml"}  # kustomize's own file and the rebuild's config
MANIFESTS = sorted(p for p in K8S.rglob("*.yaml") if p.name not in NOT_MANIFESTS)
CORE = [p for p in MANIFESTS if all(not d["apiVersion"].startswith("ray.io/") for d in load_docs(p))]
RAY = [p for p in MANIFESTS if p not in CORE]


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def test_every_deploy_yaml_has_a_validator():
    """A new YAML file under deploy/ must be a manifest, a kustomization, a launcher config or a rebuild config."""
    launcher = set((DEPLOY / "launcher").glob("*.yaml"))
    configs = {DEPLOY / "atlas.example.yaml", NIGHTLY / "atlas.yaml", DEPLOY / ".yamllint.yaml"}
    kustomizations = set(K8S.rglob("kustomization.yaml"))
    unchecked = set(deploy_yaml_files()) - set(MANIFESTS) - launcher - configs - kustomizations
    assert not unchecked, f"no validator covers {sorted(map(rel, unchecked))}"
    assert len(RAY) >= 3 and len(CORE) >= 4


@pytest.mark.parametrize("path", CORE, ids=rel)
def test_core_manifest_is_valid(path: Path):
    assert validate_k8s_file(path) == []


@pytest.mark.parametrize("path", RAY, ids=rel)
def test_kuberay_manifest_is_valid(kuberay, path: Path):
    assert validate_k8s_file(path) == []


def test_kustomize_renders_nightly_and_every_object_validates(kuberay, kubectl):
    docs, errors = kustomize_build(NIGHTLY)
    assert errors == []
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ConfigMap") == 3 and {"CronJob", "Role", "RoleBinding", "ServiceAccount"} <= set(kinds)
    assert {d["metadata"].get("namespace") for d in docs} == {"scvi-scale"}
    # the RayJob inside the generated ConfigMap is validated as a RayJob too (validate_k8s_doc does that)
    assert [p for d in docs for p in validate_k8s_doc(d)] == []


def test_kustomize_renders_base(kubectl):
    docs, errors = kustomize_build(K8S / "base")
    assert errors == [] and sorted(d["kind"] for d in docs) == ["PersistentVolumeClaim", "ServiceAccount"]


# --- planted typos: each must be rejected ------------------------------------------------------------------------

CRONJOB = NIGHTLY / "cronjob.yaml"
RBAC = NIGHTLY / "rbac.yaml"
REBUILD = NIGHTLY / "rayjob-rebuild.yaml"
TRAIN = K8S / "rayjob" / "rayjob-train.yaml"
NOTEBOOK = K8S / "raycluster" / "raycluster-notebook.yaml"


@pytest.mark.parametrize(
    ("src", "old", "new"),
    [
        pytest.param(CRONJOB, "concurrencyPolicy:", "concurencyPolicy:", id="cronjob-misspelled-field"),
        pytest.param(CRONJOB, "failedJobsHistoryLimit: 5", "failedJobsHistoryLimit: five", id="cronjob-wrong-type"),
        pytest.param(CRONJOB, "readOnly: true", "readonly: true", id="cronjob-volumemount-field-case"),
        pytest.param(
            CRONJOB,
            "          restartPolicy: Never\n",
            "          restartPolicy: Never\n          restartPolicy: [Never]\n",
            id="cronjob-restartpolicy-list",
        ),  # fmt: skip
        pytest.param(
            RBAC,
            "  apiGroup: rbac.authorization.k8s.io\n  kind: Role",
            "  apiGroups: rbac.authorization.k8s.io\n  kind: Role",
            id="rolebinding-misspelled-roleref",
        ),  # fmt: skip
        pytest.param(RBAC, "    verbs:\n", "    verb:\n", id="role-misspelled-verbs"),
        pytest.param(K8S / "base" / "pvc-data.yaml", "accessModes:", "accesModes:", id="pvc-misspelled-field"),
        pytest.param(K8S / "base" / "serviceaccount.yaml", "  annotations:", "  anotations:", id="sa-metadata"),
    ],
)
def test_core_schema_rejects_planted_typo(tmp_path, src, old, new):
    assert validate_k8s_file(plant(src, tmp_path, old, new)) != []


@pytest.mark.parametrize(
    ("src", "old", "new"),
    [
        pytest.param(REBUILD, "shutdownAfterJobFinishes:", "shutdownAfterJobFinish:", id="rayjob-misspelled-spec"),
        pytest.param(REBUILD, 'num-cpus: "0"', "num-cpus: 0", id="rayjob-rayStartParams-not-a-string"),
        pytest.param(REBUILD, "minReplicas: 2", "minReplica: 2", id="rayjob-misspelled-group-field"),
        pytest.param(REBUILD, "replicas: 2\n", "replicas: two\n", id="rayjob-replicas-wrong-type"),
        pytest.param(REBUILD, "backoffLimit: 1", "backoffLimit: once", id="rayjob-backoff-wrong-type"),
        pytest.param(REBUILD, "                resources:", "                resource:", id="rayjob-worker-container"),
        pytest.param(REBUILD, "generateName:", "generatName:", id="rayjob-misspelled-metadata"),
        pytest.param(REBUILD, "medium: Memory", "medium: [Memory]", id="rayjob-emptydir-wrong-type"),
        pytest.param(TRAIN, "ttlSecondsAfterFinished:", "ttlSecondAfterFinished:", id="train-misspelled-spec"),
        pytest.param(TRAIN, "apiVersion: ray.io/v1", "apiVersion: ray.io/v2", id="train-wrong-api-version"),
        pytest.param(NOTEBOOK, "idleTimeoutSeconds:", "idleTimeoutSecond:", id="raycluster-autoscaler-options"),
        pytest.param(
            NOTEBOOK, "enableInTreeAutoscaling: true", "enableInTreeAutoscaling: yes-please", id="raycluster-wrong-type"
        ),  # fmt: skip
        pytest.param(NOTEBOOK, "    - groupName: cpu", "    - groupNam: cpu", id="raycluster-missing-required"),
        pytest.param(NOTEBOOK, "          tolerations:", "          toleration:", id="raycluster-pod-spec"),
    ],
)
def test_kuberay_schema_rejects_planted_typo(kuberay, tmp_path, src, old, new):
    assert validate_k8s_file(plant(src, tmp_path, old, new)) != []


def test_nested_rayjob_in_configmap_is_checked(kuberay):
    """The nightly ConfigMap's RayJob text goes through the CRD check: a typo there is caught too."""
    text = REBUILD.read_text().replace("activeDeadlineSeconds:", "activeDeadlineSecond:")
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "data": {"rayjob.yaml": text}}
    assert any("activeDeadlineSecond" in p for p in validate_k8s_doc(cm))


def _copy_nightly(tmp_path: Path) -> Path:
    folder = tmp_path / "nightly"
    folder.mkdir()
    for p in NIGHTLY.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    base = tmp_path / "base"
    base.mkdir()
    for p in (K8S / "base").iterdir():
        (base / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("    files:\n      - submit.sh", "    file:\n      - submit.sh", id="misspelled-generator-field"),
        pytest.param("rayjob.yaml=rayjob-rebuild.yaml", "rayjob.yaml=rayjob-rebuld.yaml", id="missing-file"),
        pytest.param("rayjob.yaml=rayjob-rebuild.yaml", "rayjob.yaml=../rayjob-rebuild.yaml", id="outside-the-folder"),
        pytest.param("  - cronjob.yaml", "  - cronjobs.yaml", id="missing-resource"),
    ],
)
def test_kustomize_rejects_planted_mistake(tmp_path, kubectl, old, new):
    folder = _copy_nightly(tmp_path)
    (tmp_path / "rayjob-rebuild.yaml").write_bytes(REBUILD.read_bytes())  # so only the restriction can fail
    plant(NIGHTLY / "kustomization.yaml", folder, old, new)
    docs, errors = kustomize_build(folder)
    assert errors and not docs


def test_kustomize_output_with_a_typo_in_the_cronjob_is_rejected(tmp_path, kuberay, kubectl):
    folder = _copy_nightly(tmp_path)
    plant(CRONJOB, folder, "startingDeadlineSeconds:", "startingDeadlineSecond:")
    docs, errors = kustomize_build(folder)
    assert errors == []
    assert any("startingDeadlineSecond" in p for d in docs for p in validate_k8s_doc(d))


def test_yaml_error_is_a_problem(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"a": 1}) + "b: [\n")
    assert validate_k8s_file(bad) != []
