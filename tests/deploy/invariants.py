"""What the schemas cannot see: the rules that tie the deploy files to each other and to the project.

Each check takes parsed documents (or paths) and returns a list of problems, so a test asserts none on the real
files and some on a copy with a planted mistake. Schemas catch unknown fields and wrong types; these catch a
right field with a wrong value: a Ray version that is not the pin, a CronJob that may overlap itself
(``Forbidden`` passes the schema, only ``Forbid`` works), a GPU group without a GPU limit, an entrypoint that
names no real subcommand, a mounted RayJob that is not the file in the repository.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.validators import DEPLOY, K8S_VERSION, REPO, load_docs, ray_pod_templates

GPU = "nvidia.com/gpu"
SECRET_NAME = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL", re.IGNORECASE)


# --- the project's pins ------------------------------------------------------------------------------------------


def pyproject() -> dict[str, Any]:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def pinned(name: str) -> str:
    """The exact version pinned for ``name`` (``name==X`` or ``name[extras]==X``) anywhere in pyproject.toml."""
    project = pyproject()["project"]
    specs = list(project["dependencies"]) + [s for group in project["optional-dependencies"].values() for s in group]
    found = {m.group(1) for s in specs if (m := re.fullmatch(rf"{re.escape(name)}(?:\[[^\]]*\])?==([\w.]+)", s))}
    assert len(found) == 1, f"pyproject.toml pins {name} as {sorted(found) or 'nothing'}; expected one exact pin"
    return found.pop()


def dockerfile_args(path: Path) -> dict[str, str]:
    """The default of every ``ARG NAME=value`` in a Dockerfile (the first one wins, as in the global scope)."""
    args: dict[str, str] = {}
    for line in path.read_text().splitlines():
        m = re.match(r"\s*ARG\s+(\w+)=(\S+)", line)
        if m:
            args.setdefault(m.group(1), m.group(2))
    return args


def expected_image_tag(dockerfile: Path) -> str:
    """``VERSION-rayRAY-PYTHON-CUDA``: the tag deploy/README.md tells to build, from the Dockerfile's defaults."""
    a = dockerfile_args(dockerfile)
    return f"{a['SCVI_SCALE_VERSION']}-ray{a['RAY_VERSION']}-{a['PYTHON_TAG']}-{a['CUDA_TAG']}"


def check_dockerfile_pins(path: Path) -> list[str]:
    """The Dockerfile's ARG defaults are the project's pins, and both stages build FROM the pinned Ray image."""
    a = dockerfile_args(path)
    want = {
        "RAY_VERSION": pinned("ray"),
        "TORCH_VERSION": pinned("torch"),
        "SCVI_SCALE_VERSION": pyproject()["project"]["version"],
        "PYTHON_TAG": "py" + re.search(r">=(\d)\.(\d+)", pyproject()["project"]["requires-python"]).expand(r"\1\2"),
    }
    problems = [f"ARG {k}={a.get(k)!r}, the project pins {v!r}" for k, v in want.items() if a.get(k) != v]
    froms = re.findall(r"^FROM\s+(\S+)", path.read_text(), flags=re.MULTILINE)
    base = "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${CUDA_TAG}"
    problems += [f"FROM {f}: expected {base}" for f in froms if f != base]
    if not re.fullmatch(r"cu\d{3}", a.get("CUDA_TAG", "")):
        problems.append(f"ARG CUDA_TAG={a.get('CUDA_TAG')!r} is not an explicit cuXXX tag")
    return problems


# --- KubeRay documents -------------------------------------------------------------------------------------------


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template.get("spec", {}).get("containers", [])


def gpu_limit(container: dict[str, Any]) -> Any:
    return container.get("resources", {}).get("limits", {}).get(GPU)


def gpu_groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """The worker groups whose pods have a GPU limit."""
    groups = spec.get("workerGroupSpecs", [])
    return [g for g in groups if any(gpu_limit(c) is not None for c in containers(g["template"]))]


def images(doc: dict[str, Any]) -> list[str]:
    return [c.get("image", "") for _, t in ray_pod_templates(doc) for c in containers(t)]


def check_ray_versions(doc: dict[str, Any], ray_pin: str, image: str) -> list[str]:
    """rayVersion is the pin, and every head and worker container runs the one project image."""
    label = f"{doc['kind']} {doc['metadata'].get('name') or doc['metadata'].get('generateName')}"
    problems = []
    if cluster_spec(doc).get("rayVersion") != ray_pin:
        problems.append(f"{label}: rayVersion {cluster_spec(doc).get('rayVersion')!r}, the ray pin is {ray_pin!r}")
    for where, template in ray_pod_templates(doc):
        if where == "submitterPodTemplate":
            continue
        for c in containers(template):
            if c.get("image") != image:
                problems.append(f"{label} {where} {c.get('name')}: image {c.get('image')!r}, expected {image!r}")
    return problems


def _quantity(value: Any) -> str:
    return str(value) if value is not None else "<unset>"


def check_ray_pods(doc: dict[str, Any]) -> list[str]:
    """Head without tasks, string rayStartParams, GPU groups with GPU limits, tolerations and /dev/shm, an identity."""
    label = f"{doc['kind']} {doc['metadata'].get('name') or doc['metadata'].get('generateName')}"
    spec = cluster_spec(doc)
    problems = []
    head = spec["headGroupSpec"]
    if head.get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append(f'{label}: the head\'s rayStartParams num-cpus must be "0" (no tasks on the head)')
    groups = [("head", head), *[(g.get("groupName", "?"), g) for g in spec.get("workerGroupSpecs", [])]]
    for name, group in groups:
        params = group.get("rayStartParams", {})
        problems += [f"{label} {name}: rayStartParams {k} must be a string" for k, v in params.items()
                     if not isinstance(v, str)]  # fmt: skip
        if "num-gpus" in params:
            problems.append(f"{label} {name}: num-gpus is set by hand; Ray reads it from the GPU limit")
        pod = group["template"].get("spec", {})
        if pod.get("serviceAccountName") != "scvi-scale-runner":
            problems.append(f"{label} {name}: serviceAccountName must be scvi-scale-runner (object-store identity)")
        for c in pod.get("containers", []):
            res = c.get("resources", {})
            req, lim = res.get("requests", {}), res.get("limits", {})
            if not req.get("memory") or not lim.get("memory"):
                problems.append(f"{label} {name} {c.get('name')}: set memory requests and limits")
            for e in c.get("env", []):
                if SECRET_NAME.search(e.get("name", "")) and "value" in e:
                    problems.append(f"{label} {name}: env {e['name']} carries a literal value; use a Secret")
            if GPU not in req and GPU not in lim:
                continue
            if _quantity(req.get(GPU)) != _quantity(lim.get(GPU)):
                problems.append(f"{label} {name}: {GPU} requests {req.get(GPU)!r} != limits {lim.get(GPU)!r}")
            tolerated = any(t.get("key") == GPU and t.get("operator") in ("Exists", "Equal")
                            for t in pod.get("tolerations", []))  # fmt: skip
            if not tolerated:
                problems.append(f"{label} {name}: no toleration for the {GPU} taint")
            shm = [m["name"] for m in c.get("volumeMounts", []) if m.get("mountPath") == "/dev/shm"]
            memory_vols = {v["name"] for v in pod.get("volumes", []) if v.get("emptyDir", {}).get("medium") == "Memory"}
            if not shm or shm[0] not in memory_vols:
                problems.append(f"{label} {name}: /dev/shm must be an emptyDir with medium Memory")
    return problems


def check_rayjob_lifecycle(doc: dict[str, Any]) -> list[str]:
    """An ephemeral RayJob cleans up after itself and cannot run or wait for ever."""
    spec = doc["spec"]
    label = f"RayJob {doc['metadata'].get('generateName')}"
    problems = []
    if "generateName" not in doc["metadata"] or "name" in doc["metadata"]:
        problems.append(f"{label}: use metadata.generateName (a fresh name on every kubectl create)")
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append(f"{label}: shutdownAfterJobFinishes must be true (the cluster is deleted after the job)")
    if not spec.get("ttlSecondsAfterFinished", 0) > 0:
        problems.append(f"{label}: ttlSecondsAfterFinished must be > 0")
    for key in ("activeDeadlineSeconds", "preRunningDeadlineSeconds"):
        if not spec.get(key, 0) > 0:
            problems.append(f"{label}: {key} must be set")
    if not isinstance(spec.get("backoffLimit"), int):
        problems.append(f"{label}: backoffLimit must be set")
    if "deletionStrategy" in spec:  # a CEL rule of the CRD that jsonschema does not run
        problems.append(f"{label}: deletionStrategy cannot be combined with shutdownAfterJobFinishes")
    env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
    if set(env) - {"env_vars"}:
        problems.append(f"{label}: runtimeEnvYAML may only set env_vars (code is baked into the image): {sorted(env)}")
    return problems


def check_raycluster_autoscaling(doc: dict[str, Any]) -> list[str]:
    spec = doc["spec"]
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("RayCluster: enableInTreeAutoscaling must be true")
    if spec.get("autoscalerOptions", {}).get("version") != "v2":
        problems.append("RayCluster: autoscalerOptions.version must be v2")
    if not gpu_groups(spec):
        problems.append("RayCluster: no GPU worker group")
    for g in gpu_groups(spec):
        if g.get("minReplicas") != 0:
            problems.append(f"RayCluster {g['groupName']}: minReplicas must be 0 (GPUs scale to zero)")
    return problems


# --- entrypoints -------------------------------------------------------------------------------------------------


def entrypoint_argv(entrypoint: str) -> list[str]:
    """The scvi-scale arguments of ``python -m scvi_scale ...`` (or ``scvi-scale ...``)."""
    words = shlex.split(entrypoint)
    if words[:3] == ["python", "-m", "scvi_scale"]:
        return words[3:]
    if words[:1] == ["scvi-scale"]:
        return words[1:]
    raise AssertionError(f"entrypoint {entrypoint!r} does not run scvi-scale (python -m scvi_scale ...)")


def check_cli_args(argv: list[str]) -> list[str]:
    """The arguments parse with the real ``scvi-scale`` parser: a real subcommand and real flags."""
    from scvi_scale import cli

    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            cli._build_parser().parse_args(argv)
    except SystemExit as e:
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        return [f"scvi-scale {' '.join(argv)}: {lines[-1] if lines else f'exit {e.code}'}"]
    return []


# --- the nightly kustomization -----------------------------------------------------------------------------------


def generator_files(kustomization: Path) -> dict[str, dict[str, Path]]:
    """ConfigMap name -> {key: source file} from a kustomization's configMapGenerator."""
    k = load_docs(kustomization)[0]
    out: dict[str, dict[str, Path]] = {}
    for gen in k.get("configMapGenerator", []):
        files = {}
        for entry in gen.get("files", []):
            key, _, src = entry.partition("=") if "=" in entry else (Path(entry).name, "", entry)
            files[key] = kustomization.parent / src
        out[gen["name"]] = files
    return out


def mounted_file(pod: dict[str, Any], container: dict[str, Any], path: str) -> tuple[str, str] | None:
    """(ConfigMap name, key) that ``path`` comes from in a container, if a configMap volume mounts it."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for m in container.get("volumeMounts", []):
        mount = m["mountPath"].rstrip("/")
        if path.startswith(mount + "/") and "configMap" in volumes.get(m["name"], {}):
            return volumes[m["name"]]["configMap"]["name"], path[len(mount) + 1 :]
    return None


def env_value(container: dict[str, Any], name: str) -> str | None:
    for e in container.get("env", []):
        if e.get("name") == name:
            return e.get("value")
    return None


def check_nightly(folder: Path) -> list[str]:
    """The CronJob never overlaps itself, mounts the RayJob file of this folder, and outlasts it."""
    problems = []
    gens = generator_files(folder / "kustomization.yaml")
    (cron,) = [d for d in load_docs(folder / "cronjob.yaml") if d["kind"] == "CronJob"]
    spec = cron["spec"]
    if spec.get("concurrencyPolicy") != "Forbid":
        problems.append(f"CronJob: concurrencyPolicy {spec.get('concurrencyPolicy')!r}; must be Forbid")
    job = spec["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    if job.get("backoffLimit") != 0:
        problems.append("CronJob: jobTemplate backoffLimit must be 0 (the RayJob retries, not the submitter)")
    (submit,) = pod["containers"]
    manifest = env_value(submit, "RAYJOB_MANIFEST") or ""
    source = mounted_file(pod, submit, manifest)
    rayjob_file = gens.get(source[0], {}).get(source[1]) if source else None
    if rayjob_file != folder / "rayjob-rebuild.yaml":
        problems.append(f"CronJob: RAYJOB_MANIFEST {manifest!r} is {rayjob_file}, not {folder}/rayjob-rebuild.yaml")
        return problems
    script = submit.get("command", [])[-1] if submit.get("command") else ""
    script_source = mounted_file(pod, submit, script)
    if not script_source or gens.get(script_source[0], {}).get(script_source[1]) != folder / "submit.sh":
        problems.append(f"CronJob: the command {submit.get('command')} does not run this folder's submit.sh")
    (rayjob,) = load_docs(rayjob_file)
    wait = int(env_value(submit, "WAIT_TIMEOUT_SECONDS") or 0)
    ray_deadline = rayjob["spec"].get("activeDeadlineSeconds", 0)
    if not ray_deadline < wait < job.get("activeDeadlineSeconds", 0):
        problems.append(
            f"deadlines must grow outwards: RayJob {ray_deadline} < WAIT_TIMEOUT_SECONDS {wait} < "
            f"Job activeDeadlineSeconds {job.get('activeDeadlineSeconds')}"
        )
    # the submitter's identity may create, watch and delete RayJobs
    rbac = load_docs(folder / "rbac.yaml")
    bound = [s["name"] for d in rbac if d["kind"] == "RoleBinding" for s in d.get("subjects", [])]
    if pod.get("serviceAccountName") not in bound:
        problems.append(f"CronJob: serviceAccountName {pod.get('serviceAccountName')!r} is bound to no Role")
    rules = [r for d in rbac if d["kind"] == "Role" for r in d["rules"]]
    verbs = {v for r in rules if "ray.io" in r.get("apiGroups", []) and "rayjobs" in r.get("resources", [])
             for v in r["verbs"]}  # fmt: skip
    if not {"create", "get", "delete"} <= verbs:
        problems.append(f"Role: rayjobs.ray.io verbs {sorted(verbs)}; submit.sh needs create, get and delete")
    m = re.search(r"/kubectl:v?(\d+)\.(\d+)\.\d+", submit.get("image", ""))
    if not m or f"{m.group(1)}.{m.group(2)}" != K8S_VERSION:
        problems.append(f"CronJob: kubectl image {submit.get('image')!r} is not kubectl {K8S_VERSION}.x")
    return problems


def check_rebuild_config_mount(rayjob: dict[str, Any], kustomization: Path) -> tuple[list[str], Path | None]:
    """The RayJob's ``--config`` is a file every pod mounts from the generated atlas ConfigMap; that file's path.

    The ConfigMap must keep its name (no hash suffix): the RayJob sits as text inside another ConfigMap, where
    kustomize does not rewrite names.
    """
    argv = entrypoint_argv(rayjob["spec"]["entrypoint"])
    if "--config" not in argv:
        return ["the rebuild entrypoint has no --config"], None
    config = argv[argv.index("--config") + 1]
    gens = generator_files(kustomization)
    options = {g["name"]: g.get("options", {}) for g in load_docs(kustomization)[0].get("configMapGenerator", [])}
    problems, local = [], None
    for where, template in ray_pod_templates(rayjob):
        pod = template["spec"]
        for c in pod["containers"]:
            source = mounted_file(pod, c, config)
            if source is None:
                problems.append(f"{where}: {config} is not mounted from a ConfigMap")
                continue
            local = gens.get(source[0], {}).get(source[1])
            if local is None:
                problems.append(f"{where}: ConfigMap {source[0]} key {source[1]} is not generated by {kustomization}")
            elif not options[source[0]].get("disableNameSuffixHash"):
                problems.append(f"ConfigMap {source[0]}: the RayJob names it literally; set disableNameSuffixHash")
    return problems, local


def check_rebuild_matches_cluster(rayjob: dict[str, Any], atlas: dict[str, Any]) -> list[str]:
    """The rebuild's Ray Train settings fit the RayJob's cluster: one worker per GPU pod, paths on the data volume."""
    problems = []
    tc = (atlas.get("train") or {}).get("train") or {}
    groups = gpu_groups(cluster_spec(rayjob))
    gpu_pods = sum(g.get("replicas", 0) for g in groups)
    gpus_per_pod = {str(gpu_limit(c)) for g in groups for c in containers(g["template"]) if gpu_limit(c) is not None}
    if tc.get("launcher") != "ray" or tc.get("address") != "auto":
        problems.append("atlas train.train: launcher ray with address auto (the RayJob's cluster)")
    if tc.get("workers") != gpu_pods:
        problems.append(f"atlas train.train.workers {tc.get('workers')} != {gpu_pods} GPU pods in the RayJob")
    if gpus_per_pod != {str(tc.get("gpus_per_worker"))}:
        problems.append(f"atlas train.train.gpus_per_worker {tc.get('gpus_per_worker')} != GPUs per pod {gpus_per_pod}")
    mounts = {m["mountPath"] for _, t in ray_pod_templates(rayjob) for c in containers(t)
              for m in c.get("volumeMounts", []) if m["name"] == "data"}  # fmt: skip
    for key in ("store", "runs"):
        path = str(atlas.get(key, ""))
        if not any(path.startswith(m.rstrip("/") + "/") for m in mounts):
            problems.append(f"atlas {key} {path!r} is not on the shared data volume ({sorted(mounts)})")
    return problems


def deploy_yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
