"""The nightly submitter (deploy/k8s/nightly/submit.sh) against a stand-in kubectl: it creates the RayJob once,
exits 0 only when the Ray job succeeded, and deletes the RayJob when it gives up, so no rebuild outlives its slot.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.deploy.validators import DEPLOY

SUBMIT = DEPLOY / "k8s" / "nightly" / "submit.sh"
NAME = "rayjob.ray.io/scvi-scale-rebuild-x7k2p"

# a kubectl that logs its arguments and answers `get` from files: one jobDeploymentStatus per call (the last
# repeats; "-" is an empty status), and a fixed jobStatus
FAKE_KUBECTL = f"""#!/bin/sh
echo "$*" >> "$FAKE_DIR/calls"
if [ "$1" = "--namespace" ]; then shift 2; fi
case "$1" in
    create) echo "{NAME}" ;;
    delete) ;;
    get)
        case "$*" in
            *jobDeploymentStatus*)
                n=$(($(cat "$FAKE_DIR/n" 2>/dev/null || echo 0) + 1))
                echo "$n" > "$FAKE_DIR/n"
                line=$(sed -n "${{n}}p" "$FAKE_DIR/statuses")
                [ -n "$line" ] || line=$(tail -n 1 "$FAKE_DIR/statuses")
                [ "$line" = "-" ] || printf '%s' "$line" ;;
            *jobStatus*) cat "$FAKE_DIR/jobstatus" ;;
            *) printf 'details' ;;
        esac ;;
    *) exit 1 ;;
esac
"""


@pytest.fixture
def fake(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    kubectl = bin_dir / "kubectl"
    kubectl.write_text(FAKE_KUBECTL)
    kubectl.chmod(0o755)
    manifest = tmp_path / "rayjob.yaml"
    manifest.write_text("kind: RayJob\n")

    def start(statuses: list[str], job_status: str = "SUCCEEDED", **env: str) -> subprocess.Popen:
        (tmp_path / "statuses").write_text("\n".join(statuses) + "\n")
        (tmp_path / "jobstatus").write_text(job_status)
        full_env = {
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "FAKE_DIR": str(tmp_path),
            "RAYJOB_MANIFEST": str(manifest),
            "NAMESPACE": "scvi-scale",
            "POLL_SECONDS": "0",
            **env,
        }
        return subprocess.Popen(["sh", str(SUBMIT)], env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)  # fmt: skip

    def run(statuses: list[str], job_status: str = "SUCCEEDED", **env: str) -> tuple[int, str, list[str]]:
        proc = start(statuses, job_status, **env)
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out, calls()

    def calls() -> list[str]:
        path = tmp_path / "calls"
        return path.read_text().splitlines() if path.exists() else []

    run.start = start
    run.calls = calls
    run.manifest = manifest
    return run


def test_success_after_the_job_runs(fake):
    code, out, calls = fake(["-", "Initializing", "Running", "Running", "Complete"])
    assert code == 0, out
    assert calls[0] == f"--namespace scvi-scale create -f {fake.manifest} -o name"
    assert sum(" create " in f" {c} " for c in calls) == 1
    assert not any("delete" in c for c in calls)
    assert "succeeded" in out and "jobDeploymentStatus=Running" in out


@pytest.mark.parametrize(
    ("statuses", "job_status"),
    [
        pytest.param(["Running", "Failed"], "FAILED", id="failed"),
        pytest.param(["Running", "Complete"], "FAILED", id="complete-but-the-ray-job-failed"),
        pytest.param(["Complete"], "STOPPED", id="stopped"),
        pytest.param(["ValidationFailed"], "", id="invalid-rayjob"),
    ],
)
def test_failure_exits_1_and_leaves_the_rayjob_for_its_ttl(fake, statuses, job_status):
    code, out, calls = fake(statuses, job_status)
    assert code == 1, out
    assert not any("delete" in c for c in calls)


def test_deadline_deletes_the_rayjob(fake):
    code, out, calls = fake(["Running"], "RUNNING", WAIT_TIMEOUT_SECONDS="0")
    assert code == 1, out
    assert calls[-1] == f"--namespace scvi-scale delete {NAME} --wait=false"
    assert "no result after 0s" in out


def test_sigterm_deletes_the_rayjob_at_once(fake):
    """The CronJob's activeDeadlineSeconds ends the pod with SIGTERM: the RayJob goes with it, without waiting."""
    proc = fake.start(["Running"], "RUNNING", POLL_SECONDS="30")
    deadline = time.monotonic() + 30
    while not any("jobDeploymentStatus" in c for c in fake.calls()) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # into the poll's sleep
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 1, out
    assert time.monotonic() - started < 10  # not after the 30 s sleep
    assert f"--namespace scvi-scale delete {NAME} --wait=false" in fake.calls()


def test_missing_manifest_or_bad_settings_exit_2_without_creating(fake):
    code, out, calls = fake(["Complete"], RAYJOB_MANIFEST="/nonexistent/rayjob.yaml")
    assert code == 2 and calls == [], out
    code, out, calls = fake(["Complete"], POLL_SECONDS="soon")
    assert code == 2 and calls == [], out


def test_no_namespace_uses_kubectls_current_one(fake):
    code, out, calls = fake(["Complete"], NAMESPACE="")
    assert code == 0, out
    assert calls[0] == f"create -f {fake.manifest} -o name"
