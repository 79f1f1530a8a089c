"""The deploy files agree with each other and with the project: one Ray version, one image, real entrypoints,
the CronJob mounts the repository's RayJob and outlasts it, GPU groups really get GPUs, and so on.

Each check also gets a copy with one planted mistake that no schema would see, and must reject it.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from tests.deploy import invariants as inv
from tests.deploy.validators import DEPLOY, load_docs, plant

K8S = DEPLOY / "k8s"
NIGHTLY = K8S / "nightly"
REBUILD = NIGHTLY / "rayjob-rebuild.yaml"
TRAIN = K8S / "rayjob" / "rayjob-train.yaml"
NOTEBOOK = K8S / "raycluster" / "raycluster-notebook.yaml"
RAY_FILES = [REBUILD, TRAIN, NOTEBOOK]
RAYJOBS = [REBUILD, TRAIN]
LAUNCHER = sorted((DEPLOY / "launcher").glob("*.yaml"))


def one(path: Path) -> dict:
    (doc,) = load_docs(path)
    return doc


# --- one Ray version and one image everywhere --------------------------------------------------------------------


@pytest.mark.parametrize("path", RAY_FILES, ids=lambda p: p.name)
def test_ray_version_and_image_match_the_pin(path, ray_pin, image):
    assert inv.check_ray_versions(one(path), ray_pin, image) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param('rayVersion: "2.60.0"', 'rayVersion: "2.59.0"', id="rayVersion"),
        pytest.param(
            "scvi-scale:0.1.0-ray2.60.0-py311-cu128\n", "scvi-scale:0.1.0-ray2.59.0-py311-cu128\n", id="image-tag"
        ),  # fmt: skip
    ],
)
def test_version_check_rejects_planted_mismatch(tmp_path, ray_pin, image, old, new):
    assert inv.check_ray_versions(one(plant(REBUILD, tmp_path, old, new)), ray_pin, image) != []


@pytest.mark.parametrize("path", LAUNCHER, ids=lambda p: p.name)
def test_launcher_runs_the_same_image_without_setup(path, image):
    config = one(path)
    assert config["docker"]["image"] == image
    assert not any(k in config["docker"] for k in ("head_image", "worker_image"))
    # Ray's defaults would otherwise install packages (a nightly Ray) over the image at every start
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands"):
        assert config.get(key) == [], key
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu = config["available_node_types"]["gpu"]
    assert gpu["min_workers"] == 0


# --- pods: GPUs, /dev/shm, identity ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", RAY_FILES, ids=lambda p: p.name)
def test_ray_pods_are_well_formed(path):
    assert inv.check_ray_pods(one(path)) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param(
            '                    nvidia.com/gpu: "1"\n                  limits:',
            "                  limits:",
            id="gpu-request-missing",
        ),  # fmt: skip
        pytest.param("key: nvidia.com/gpu", "key: nvidia.com/gpus", id="toleration-for-another-taint"),
        pytest.param("medium: Memory", 'medium: ""', id="shm-on-disk"),
        pytest.param('num-cpus: "0"', 'num-cpus: "4"', id="tasks-on-the-head"),
        pytest.param("rayStartParams: {}", 'rayStartParams: {num-gpus: "1"}', id="num-gpus-by-hand"),
        pytest.param(
            "            serviceAccountName: scvi-scale-runner",
            "            serviceAccountName: default",
            id="worker-identity",
        ),  # fmt: skip
        pytest.param(
            "              env:\n",
            "              env:\n                - name: AWS_SECRET_ACCESS_KEY\n                  value: abc\n",
            id="literal-secret",
        ),  # fmt: skip
    ],
)
def test_pod_check_rejects_planted_mistake(tmp_path, old, new):
    assert inv.check_ray_pods(one(plant(REBUILD, tmp_path, old, new))) != []


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_cleans_up_and_is_bounded(path):
    assert inv.check_rayjob_lifecycle(one(path)) == []


@pytest.mark.parametrize(
    ("old", "new"),
    [
        pytest.param("shutdownAfterJobFinishes: true", "shutdownAfterJobFinishes: false", id="cluster-kept"),
        pytest.param("  preRunningDeadlineSeconds: 3600", "  suspend: false", id="no-pre-running-deadline"),
        pytest.param(
            '      PYTHONUNBUFFERED: "1"',
            '      PYTHONUNBUFFERED: "1"\n    pip:\n      - scvi-scale',
            id="runtime-pip-install",
        ),  # fmt: skip
        pytest.param("  generateName: scvi-scale-rebuild-", "  name: scvi-scale-rebuild", id="fixed-name"),
    ],
)
def test_rayjob_check_rejects_planted_mistake(tmp_path, old, new):
    assert inv.check_rayjob_lifecycle(one(plant(REBUILD, tmp_path, old, new))) != []


def test_notebook_cluster_autoscales_gpus_from_zero():
    assert inv.check_raycluster_autoscaling(one(NOTEBOOK)) == []


def test_autoscaling_check_rejects_planted_mistake(tmp_path):
    assert inv.check_raycluster_autoscaling(one(plant(NOTEBOOK, tmp_path, "version: v2", "version: v1")))
    assert inv.check_raycluster_autoscaling(
        one(plant(NOTEBOOK, tmp_path, "      minReplicas: 0  # scales", "      minReplicas: 1  # scales"))
    )


def test_every_volume_claim_and_service_account_exists_in_base():
    base = [d for p in (K8S / "base").glob("*.yaml") if p.name != "kustomization.yaml" for d in load_docs(p)]
    claims = {d["metadata"]["name"] for d in base if d["kind"] == "PersistentVolumeClaim"}
    accounts = {d["metadata"]["name"] for d in base if d["kind"] == "ServiceAccount"}
    for path in RAY_FILES:
        for _, template in inv.ray_pod_templates(one(path)):
            pod = template["spec"]
            assert pod["serviceAccountName"] in accounts
            used = {
                v["persistentVolumeClaim"]["claimName"] for v in pod.get("volumes", []) if "persistentVolumeClaim" in v
            }
            assert used <= claims, f"{path.name}: {sorted(used - claims)} not in deploy/k8s/base"


# --- entrypoints name real subcommands, with real flags and a config that loads ----------------------------------


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_entrypoint_parses_with_the_real_cli(path):
    argv = inv.entrypoint_argv(one(path)["spec"]["entrypoint"])
    assert argv[0] in ("train", "rebuild")
    assert inv.check_cli_args(argv) == []


@pytest.mark.parametrize(
    "entrypoint",
    [
        pytest.param("python -m scvi_scale rebuld --config /config/atlas.yaml", id="misspelled-subcommand"),
        pytest.param("python -m scvi_scale rebuild --confg /config/atlas.yaml", id="misspelled-flag"),
        pytest.param("python -m scvi_scale train s3://b/a.zarr --out /data/r --launcher slurm", id="bad-choice"),
    ],
)
def test_cli_check_rejects_planted_mistake(entrypoint):
    assert inv.check_cli_args(inv.entrypoint_argv(entrypoint)) != []


def _main(argv: list[str]) -> tuple[int, str]:
    from scvi_scale import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 2
    return code, out.getvalue() + err.getvalue()


def test_train_entrypoint_config_resolves():
    argv = inv.entrypoint_argv(one(TRAIN)["spec"]["entrypoint"])
    code, output = _main([*argv, "--dry-run"])
    assert code == 0, output
    resolved = yaml.safe_load(output)
    assert resolved["train"]["launcher"] == "ray" and resolved["train"]["address"] == "auto"
    groups = inv.gpu_groups(inv.cluster_spec(one(TRAIN)))
    assert resolved["train"]["workers"] == sum(g["replicas"] for g in groups)


def test_rebuild_config_is_mounted_from_the_generated_configmap_and_loads():
    rayjob = one(REBUILD)
    problems, local = inv.check_rebuild_config_mount(rayjob, NIGHTLY / "kustomization.yaml")
    assert problems == [] and local == NIGHTLY / "atlas.yaml"
    code, output = _main(["rebuild", "--config", str(local), "--dry-run"])
    assert code == 0, output
    assert inv.check_rebuild_matches_cluster(rayjob, one(local)) == []


def test_rebuild_config_keys_are_the_examples():
    """The cluster config is the documented example adapted: no key the example does not have."""
    example, cluster = one(DEPLOY / "atlas.example.yaml"), one(NIGHTLY / "atlas.yaml")
    assert set(cluster) <= set(example)
    code, output = _main(["rebuild", "--config", str(DEPLOY / "atlas.example.yaml"), "--dry-run"])
    assert code == 0, output


@pytest.mark.parametrize(
    ("src", "old", "new"),
    [
        pytest.param(NIGHTLY / "atlas.yaml", "    workers: 2", "    workers: 3", id="workers-not-gpu-pods"),
        pytest.param(NIGHTLY / "atlas.yaml", "store: /data/atlas", "store: /scratch/atlas", id="store-off-volume"),
        pytest.param(NIGHTLY / "atlas.yaml", "    address: auto", "    address: null", id="local-ray"),
    ],
)
def test_rebuild_cluster_check_rejects_planted_mistake(tmp_path, src, old, new):
    assert inv.check_rebuild_matches_cluster(one(REBUILD), one(plant(src, tmp_path, old, new))) != []


def test_rebuild_mount_check_rejects_planted_mistake(tmp_path):
    bad = plant(REBUILD, tmp_path, "--config /config/atlas.yaml", "--config /etc/atlas.yaml")
    assert inv.check_rebuild_config_mount(one(bad), NIGHTLY / "kustomization.yaml")[0] != []


# --- the nightly CronJob -----------------------------------------------------------------------------------------


def test_nightly_cronjob_forbids_overlap_and_mounts_this_rayjob():
    assert inv.check_nightly(NIGHTLY) == []


def test_cronjob_mounts_the_same_rayjob_file_after_kustomize(kubectl):
    """What the CronJob's pod reads at RAYJOB_MANIFEST is byte for byte deploy/k8s/nightly/rayjob-rebuild.yaml."""
    from tests.deploy.validators import kustomize_build

    docs, errors = kustomize_build(NIGHTLY)
    assert errors == []
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (submit,) = pod["containers"]
    name, key = inv.mounted_file(pod, submit, inv.env_value(submit, "RAYJOB_MANIFEST"))
    (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name]  # hash suffix included
    assert cm["data"][key] == REBUILD.read_text()
    script_name, script_key = inv.mounted_file(pod, submit, submit["command"][-1])
    (script,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == script_name]
    assert script["data"][script_key] == (NIGHTLY / "submit.sh").read_text()
    atlas = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "scvi-scale-atlas"]
    assert atlas and atlas[0]["data"]["atlas.yaml"] == (NIGHTLY / "atlas.yaml").read_text()


def _nightly_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "nightly"
    folder.mkdir()
    for p in NIGHTLY.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


@pytest.mark.parametrize(
    ("name", "old", "new"),
    [
        pytest.param("cronjob.yaml", "concurrencyPolicy: Forbid", "concurrencyPolicy: Forbidden", id="forbidden"),
        pytest.param("cronjob.yaml", "concurrencyPolicy: Forbid", "concurrencyPolicy: Allow", id="allow-overlap"),
        pytest.param(
            "cronjob.yaml",
            "/etc/scvi-scale/rayjob/rayjob.yaml",
            "/etc/scvi-scale/rayjob/job.yaml",
            id="manifest-not-mounted",
        ),  # fmt: skip
        pytest.param(
            "kustomization.yaml", "rayjob.yaml=rayjob-rebuild.yaml", "rayjob.yaml=rbac.yaml", id="another-file-mounted"
        ),  # fmt: skip
        pytest.param("cronjob.yaml", 'value: "25200"', 'value: "3600"', id="gives-up-before-the-rayjob"),
        pytest.param(
            "cronjob.yaml",
            "activeDeadlineSeconds: 27000",
            "activeDeadlineSeconds: 20000",
            id="killed-before-the-rayjob",
        ),  # fmt: skip
        pytest.param("rbac.yaml", "      - delete  #", "      - patch  #", id="cannot-delete"),
        pytest.param(
            "cronjob.yaml",
            "serviceAccountName: scvi-scale-nightly",
            "serviceAccountName: default",
            id="unbound-identity",
        ),  # fmt: skip
        pytest.param(
            "cronjob.yaml",
            "image: registry.k8s.io/kubectl:v1.33.0",
            "image: registry.k8s.io/kubectl:v1.25.0",
            id="kubectl-skew",
        ),  # fmt: skip
    ],
)
def test_nightly_check_rejects_planted_mistake(tmp_path, name, old, new):
    folder = _nightly_copy(tmp_path)
    plant(NIGHTLY / name, folder, old, new)
    assert inv.check_nightly(folder) != []


def test_readme_names_every_deploy_file():
    text = (DEPLOY / "README.md").read_text()
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.name not in ("README.md", "SCALING.md")]
    missing = sorted(str(p.relative_to(DEPLOY)) for p in files if p.name not in text)
    assert not missing, f"deploy/README.md does not mention {missing}"
    assert "(SCALING.md)" in text
