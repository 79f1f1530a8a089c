"""The run root's layout: published versions, the ``latest`` pointer, attempts' work folders, the lock.

::

    RUNS/
      latest                  {"version": "v0003", ...}: written last, atomically (temporary name, then rename)
      versions/v0001/         model.pt, config.yaml, metrics.csv, split.npz, manifest.json (a run directory)
      versions/.v0002.partial being assembled; renamed to v0002 in one step when complete
      work/a0004/             an attempt: state.json, done/<step> markers, run/ (training), downloads/
      .lock                   held (flock) while a rebuild runs
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scvi_scale.store.errors import InputError

__all__ = ["RunRoot", "write_json"]

RUN_FILES = ("model.pt", "config.yaml", "metrics.csv", "split.npz")


def _plain(value: Any) -> Any:
    """Strict JSON: NaN and infinities (numbers not computable) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_json(path: Path, value: Any) -> None:
    """Write JSON under a temporary name, flush it to disk, then rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        json.dump(_plain(value), fh, indent=2, sort_keys=True, default=str, allow_nan=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


class RunRoot:
    """``RUNS``: where versions are published and attempts do their work."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.versions = self.path / "versions"
        self.work = self.path / "work"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run root's lock; another rebuild running on it is an error (the lock dies with its process)."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "w") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"{self.path}: another rebuild is running on this run root") from None
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    # ---- published versions ----

    def latest(self) -> dict[str, Any] | None:
        """The ``latest`` pointer, or None before the first version."""
        p = self.path / "latest"
        return read_json(p) if p.is_file() else None

    def latest_dir(self) -> Path | None:
        pointer = self.latest()
        return self.versions / pointer["version"] if pointer else None

    def manifest(self, version: str) -> dict[str, Any]:
        return read_json(self.versions / version / "manifest.json")

    def next_version(self) -> str:
        taken = [int(p.name[1:]) for p in self.versions.glob("v[0-9]*") if p.name[1:].isdigit()]
        return f"v{max(taken, default=0) + 1:04d}"

    def publish(self, version: str, run_dir: Path, manifest: dict[str, Any]) -> Path:
        """Assemble ``versions/.<version>.partial``, rename it to ``versions/<version>``, then move ``latest``.

        Rerunning after a kill at any point finishes the job: a partial folder is rebuilt, a complete one kept.
        """
        final = self.versions / version
        if not final.is_dir():
            partial = self.versions / f".{version}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            for name in RUN_FILES:
                if (run_dir / name).exists():
                    shutil.copy2(run_dir / name, partial / name)
            write_json(partial / "manifest.json", manifest)
            os.replace(partial, final)  # one rename: a version folder is complete or absent
            from scvi_scale.rebuild.run import _fault_point

            _fault_point("published-folder")
        write_json(
            self.path / "latest",
            {"version": version, "path": f"versions/{version}", "created": manifest["created"],
             "model_hash": manifest.get("model_hash")},
        )  # fmt: skip
        return final

    # ---- attempts ----

    def open_attempt(self) -> Path | None:
        """The folder of an attempt that did not finish (to resume), or None."""
        if not self.work.is_dir():
            return None
        for folder in sorted(self.work.iterdir()):
            if not folder.is_dir():
                continue
            if not (folder / "state.json").is_file():
                shutil.rmtree(folder)  # killed while being created: nothing in it was started
            elif not (folder / "result.json").is_file():
                return folder
        return None

    def new_attempt(self, state: dict[str, Any]) -> Path:
        self.work.mkdir(parents=True, exist_ok=True)
        taken = [int(p.name[1:]) for p in self.work.glob("a[0-9]*") if p.name[1:].isdigit()]
        folder = self.work / f"a{max(taken, default=0) + 1:04d}"
        folder.mkdir()
        write_json(folder / "state.json", {**state, "attempt": folder.name})
        return folder

    def last_result(self) -> dict[str, Any] | None:
        """The result of the most recent finished attempt."""
        if not self.work.is_dir():
            return None
        done = sorted(p for p in self.work.iterdir() if (p / "result.json").is_file())
        return read_json(done[-1] / "result.json") if done else None


class Steps:
    """Per-step done markers of one attempt (``done/<step>``, with the step's JSON result)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder / "done"
        self.folder.mkdir(parents=True, exist_ok=True)

    def done(self, step: str) -> dict[str, Any] | None:
        p = self.folder / step
        return read_json(p) if p.is_file() else None

    def mark(self, step: str, value: dict[str, Any] | None = None) -> dict[str, Any]:
        write_json(self.folder / step, value or {})
        return value or {}
