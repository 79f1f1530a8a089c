"""The validators behind tests/deploy: each runs a real tool or a published schema, and returns the problems it found.

Every function returns a list of one-line problems (empty: valid), so a test can assert that a good manifest has
none and that a manifest with a planted typo has some. Nothing here is a hand-written schema:

- YAML: yamllint with ``deploy/.yamllint.yaml``;
- core Kubernetes kinds: kubernetes-validate's bundled OpenAPI schemas, strict (unknown fields are errors);
- RayJob / RayCluster: jsonschema against the ``openAPIV3Schema`` of KubeRay's own CRDs (``../shared/schemas``),
  with objects closed as the API server's structural pruning would (an unknown field is an error, not dropped);
- Ray cluster-launcher YAML: Ray's ``prepare_config`` + ``validate_config`` (what ``ray up`` runs);
- the Dockerfile: hadolint; shell scripts: shellcheck; kustomizations: ``kubectl kustomize``.
"""

from __future__ import annotations

import copy
import functools
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
YAMLLINT_CONFIG = DEPLOY / ".yamllint.yaml"
KUBERAY_SCHEMAS = REPO.parent / "shared" / "schemas" / "kuberay-v1.6.2"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# the Kubernetes minor the manifests are checked against; the nightly submitter's kubectl image has the same minor
K8S_VERSION = "1.33"
BIN = Path(sys.executable).parent  # the venv's console scripts: yamllint, hadolint, shellcheck


def tool(name: str) -> str:
    """The path of a command-line tool installed by the dev extra (next to this Python), else on PATH."""
    local = BIN / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: install the dev extra (scripts/setup.sh dev)")
    return found


def load_docs(path: Path) -> list[dict[str, Any]]:
    """Every non-empty YAML document in a file."""
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# --- YAML, Dockerfile, shell -------------------------------------------------------------------------------------


def yamllint(*paths: Path) -> list[str]:
    """yamllint's problems (warnings included) for files or folders, with the project's config."""
    proc = subprocess.run(
        [tool("yamllint"), "-f", "parsable", "-s", "-c", str(YAMLLINT_CONFIG), *map(str, paths)],
        capture_output=True,
        text=True,
    )
    problems = _lines(proc.stdout)
    if proc.returncode != 0 and not problems:
        problems = _lines(proc.stderr) or [f"yamllint exited {proc.returncode}"]
    return problems


def hadolint(dockerfile: Path) -> list[str]:
    """hadolint's findings at every level (info included) for a Dockerfile."""
    config = dockerfile.parent / ".hadolint.yaml"
    cmd = [tool("hadolint"), "--no-color"]
    if config.exists():
        cmd += ["--config", str(config)]
    proc = subprocess.run([*cmd, str(dockerfile)], capture_output=True, text=True)
    problems = _lines(proc.stdout) + _lines(proc.stderr)
    return problems or ([f"hadolint exited {proc.returncode}"] if proc.returncode else [])


def shellcheck(*scripts: Path) -> list[str]:
    """shellcheck's findings (style level included); each script's shebang picks the dialect (sh, bash)."""
    proc = subprocess.run(
        [tool("shellcheck"), "--format=gcc", "--severity=style", "--external-sources", *map(str, scripts)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    problems = _lines(proc.stdout) + _lines(proc.stderr)
    return problems or ([f"shellcheck exited {proc.returncode}"] if proc.returncode else [])


# --- core Kubernetes kinds ---------------------------------------------------------------------------------------


def _schema_error(e: Any) -> str:
    where = "/".join(str(p) for p in e.absolute_path) or "<root>"
    return f"{where}: {e.message}"


def validate_core(doc: dict[str, Any]) -> list[str]:
    """A core Kubernetes object against kubernetes-validate's strict schema for ``K8S_VERSION``."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{doc.get('kind')} {_name(doc)}: {_schema_error(e)}"]
    except kubernetes_validate.SchemaNotFoundError as e:
        return [f"{doc.get('kind')} {_name(doc)}: no Kubernetes schema ({e})"]
    return []


def validate_pod_template(template: dict[str, Any], where: str) -> list[str]:
    """A pod template (metadata + spec) checked as the template of a core ``v1/PodTemplate``."""
    wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": template}
    return [f"{where}: {p}" for p in validate_core(wrapped)]


def validate_object_meta(meta: dict[str, Any], where: str) -> list[str]:
    """A custom resource's ``metadata`` (which its CRD leaves open) against Kubernetes' ObjectMeta schema."""
    wrapped = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    return [f"{where}: {p}" for p in validate_core(wrapped)]


def _name(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata") or {}
    return str(meta.get("name") or meta.get("generateName") or "?")


# --- KubeRay custom resources ------------------------------------------------------------------------------------


def _close(schema: Any) -> None:
    """Forbid unknown fields wherever a schema lists its properties, as the API server's pruning makes them vanish.

    Walks the schema keywords (not the property names), so a field that happens to be called ``properties`` or
    ``items`` is never mistaken for a keyword. Maps (``additionalProperties`` given) and objects that preserve
    unknown fields stay open.
    """
    if not isinstance(schema, dict):
        return
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        schema["additionalProperties"] = False
    for sub in (schema.get("properties") or {}).values():
        _close(sub)
    for key in ("items", "additionalProperties", "not"):
        _close(schema.get(key))
    for key in ("anyOf", "allOf", "oneOf"):
        for sub in schema.get(key) or []:
            _close(sub)


@functools.cache
def crd_validator(kind: str) -> Any:
    """A jsonschema validator for a KubeRay kind: the storage version's openAPIV3Schema from the CRD, closed."""
    import jsonschema

    path = KUBERAY_SCHEMAS / CRD_FILES[kind]
    with open(path) as f:
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind, f"{path} is not the {kind} CRD"
    (version,) = [v for v in crd["spec"]["versions"] if v.get("storage")]
    schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
    _close(schema)
    validator_cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    validator_cls.check_schema(schema)
    return validator_cls(schema), f"{crd['spec']['group']}/{version['name']}"


def ray_pod_templates(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, template) for the head and every worker group of a RayCluster or a RayJob's cluster."""
    spec = doc.get("spec") or {}
    cluster = spec.get("rayClusterSpec") if doc.get("kind") == "RayJob" else spec
    cluster = cluster or {}
    head = cluster.get("headGroupSpec") or {}
    if "template" in head:
        yield "headGroupSpec.template", head["template"]
    for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
        if "template" in group:
            yield f"workerGroupSpecs[{i}]({group.get('groupName')}).template", group["template"]
    if doc.get("kind") == "RayJob" and "submitterPodTemplate" in spec:
        yield "submitterPodTemplate", spec["submitterPodTemplate"]


def validate_ray(doc: dict[str, Any]) -> list[str]:
    """A RayJob or RayCluster: KubeRay's CRD schema, ObjectMeta, and every pod template as a core PodTemplate."""
    kind = doc.get("kind")
    validator, api_version = crd_validator(kind)
    label = f"{kind} {_name(doc)}"
    problems = []
    if doc.get("apiVersion") != api_version:
        problems.append(f"{label}: apiVersion {doc.get('apiVersion')!r}, the CRD serves {api_version!r}")
    problems += [f"{label}: {_schema_error(e)}" for e in validator.iter_errors(doc)]
    problems += validate_object_meta(doc.get("metadata") or {}, f"{label} metadata")
    for where, template in ray_pod_templates(doc):
        problems += validate_pod_template(template, f"{label} {where}")
    return problems


def validate_k8s_doc(doc: dict[str, Any]) -> list[str]:
    """Any Kubernetes document: KubeRay kinds by their CRDs, everything else by the core schemas.

    A ConfigMap whose data holds a RayJob (the nightly's mounted manifest) has that RayJob checked as well.
    """
    if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
        return [f"not a Kubernetes object (no kind/apiVersion): {str(doc)[:80]}"]
    if doc["kind"] in CRD_FILES and str(doc["apiVersion"]).startswith("ray.io/"):
        return validate_ray(doc)
    problems = validate_core(doc)
    if doc["kind"] == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith((".yaml", ".yml")):
                for inner in yaml.safe_load_all(text):
                    if isinstance(inner, dict) and inner.get("kind") in CRD_FILES:
                        problems += [f"ConfigMap {_name(doc)} {key}: {p}" for p in validate_ray(inner)]
    return problems


def validate_k8s_file(path: Path) -> list[str]:
    """Every document of a Kubernetes manifest file."""
    try:
        docs = load_docs(path)
    except yaml.YAMLError as e:
        return [f"{path}: {e}"]
    if not docs:
        return [f"{path}: no documents"]
    return [p for doc in docs for p in validate_k8s_doc(doc)]


def kustomize_build(folder: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """``kubectl kustomize FOLDER``: the rendered documents, or the error."""
    proc = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True)
    if proc.returncode != 0:
        return [], _lines(proc.stderr) or [f"kubectl kustomize exited {proc.returncode}"]
    return [d for d in yaml.safe_load_all(proc.stdout) if d is not None], []


# --- Ray cluster launcher ----------------------------------------------------------------------------------------


def validate_launcher(config: Any) -> list[str]:
    """A cluster-launcher config as ``ray up`` checks it: defaults filled in, then Ray's schema and cross-checks."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except jsonschema.ValidationError as e:
        return [_schema_error(e)]
    except (ValueError, KeyError, TypeError, AssertionError, RuntimeError) as e:
        return [f"{type(e).__name__}: {e}"]
    return []


# --- planted mistakes ----------------------------------------------------------------------------------------------


def plant(src: Path, dst_dir: Path, old: str, new: str, name: str | None = None) -> Path:
    """A copy of ``src`` in ``dst_dir`` with ``old`` replaced by ``new`` once; fails if ``old`` is not there."""
    text = src.read_text()
    assert old in text, f"{old!r} not found in {src}: update the planted typo"
    dst = dst_dir / (name or src.name)
    dst.write_text(text.replace(old, new, 1))
    return dst
