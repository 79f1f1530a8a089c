"""The image definition: its pins are the project's, and its wheel stage builds from exactly what it copies.

No Docker daemon is needed: hadolint (test_lint.py) lints the Dockerfile, and the wheel stage's command runs here
on a copy of only the files that stage COPYs, so a file the package needs but the Dockerfile forgets fails.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile

from tests.deploy.invariants import check_dockerfile_pins, dockerfile_args, expected_image_tag, pyproject
from tests.deploy.validators import DEPLOY, REPO, plant

DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
DOCKERIGNORE = DEPLOY / "docker" / "Dockerfile.dockerignore"


def stages(text: str) -> list[str]:
    return re.split(r"^FROM\s", text, flags=re.MULTILINE)[1:]


def copies(stage: str) -> list[tuple[list[str], str]]:
    """(sources, destination) of every COPY from the build context (no --from) in a stage."""
    out = []
    for line in stage.splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            args = [w for w in words[1:] if not w.startswith("--")]
            out.append((args[:-1], args[-1]))
    return out


def test_dockerfile_pins_are_the_projects():
    assert check_dockerfile_pins(DOCKERFILE) == []


def test_dockerfile_pins_catch_a_planted_mismatch(tmp_path):
    assert check_dockerfile_pins(plant(DOCKERFILE, tmp_path, "ARG RAY_VERSION=2.60.0", "ARG RAY_VERSION=2.6.0"))
    assert check_dockerfile_pins(plant(DOCKERFILE, tmp_path, "ARG CUDA_TAG=cu128", "ARG CUDA_TAG=gpu"))


def test_image_tag_names_the_pins():
    a = dockerfile_args(DOCKERFILE)
    assert expected_image_tag(DOCKERFILE) == f"{pyproject()['project']['version']}-ray{a['RAY_VERSION']}-py311-cu128"
    assert a["TORCH_INDEX"] == "https://download.pytorch.org/whl/${CUDA_TAG}"  # torch's CUDA is the image's


def test_image_has_no_entrypoint_and_ends_as_user_ray():
    text = DOCKERFILE.read_text()
    assert not re.search(r"^(ENTRYPOINT|CMD)\b", text, flags=re.MULTILINE)  # KubeRay and the launcher start Ray
    assert re.findall(r"^USER\s+(\S+)", text, flags=re.MULTILINE)[-1] == "1000:100"  # the base image's ray


def test_dockerignore_lets_the_copied_sources_through():
    kept = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines() if line.startswith("!")}
    sources = {s.rstrip("/") for stage in stages(DOCKERFILE.read_text()) for srcs, _ in copies(stage) for s in srcs}
    assert sources and sources <= kept, f"{sorted(sources - kept)} are copied but excluded by the .dockerignore"


def test_wheel_stage_builds_the_wheel_the_runtime_stage_installs(tmp_path):
    """Run the wheel stage's build on only the copied files, and find the wheel name stage 2 installs."""
    wheel_stage, runtime_stage = stages(DOCKERFILE.read_text())
    src = tmp_path / "src"
    for sources, dest in copies(wheel_stage):
        assert dest.startswith("/tmp/src"), dest
        target = src / dest.removeprefix("/tmp/src").strip("/")
        for s in sources:
            from_path = REPO / s
            to = target / s if dest.endswith("/") else target
            if from_path.is_dir():
                shutil.copytree(from_path, to, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
            else:
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(from_path, to)
    dist = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--wheel-dir", str(dist),
         str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    version = dockerfile_args(DOCKERFILE)["SCVI_SCALE_VERSION"]
    wheel = dist / f"scvi_scale-{version}-py3-none-any.whl"
    assert f"/tmp/dist/{wheel.name}" in runtime_stage.replace("${SCVI_SCALE_VERSION}", version)
    assert wheel.is_file(), sorted(p.name for p in dist.iterdir())
    names = set(zipfile.ZipFile(wheel).namelist())
    packaged = {str(p.relative_to(REPO)) for p in (REPO / "scvi_scale").rglob("*.py")}
    assert packaged <= names, f"missing from the wheel: {sorted(packaged - names)[:5]}"
    entry_points = zipfile.ZipFile(wheel).read(f"scvi_scale-{version}.dist-info/entry_points.txt").decode()
    assert "scvi-scale = scvi_scale.cli:main" in entry_points


def test_image_extras_exist():
    extras = dockerfile_args(DOCKERFILE)["SCVI_SCALE_EXTRAS"].split(",")
    assert set(extras) <= set(pyproject()["project"]["optional-dependencies"]), extras
    assert "ray" in extras
