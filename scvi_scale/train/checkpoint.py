"""Checkpoints: atomic writes, safe reads (``weights_only=True``), and the run's final model file.

A checkpoint holds only tensors and plain Python values, so ``torch.load(weights_only=True)`` reads it and
no pickled code ever runs. Writes go to a temporary name in the same folder and are renamed into place,
so a partial checkpoint is never picked up.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "scvi-scale-checkpoint"
MODEL_FORMAT = "scvi-scale-model"
FORMAT_VERSION = 1


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def safe_load(path: str | Path, expected_format: str) -> dict[str, Any]:
    """Read a checkpoint or model file with ``weights_only=True`` and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise ValueError(f"{path} is not a readable scvi-scale file ({type(err).__name__}: {str(err)[:200]})") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        raise ValueError(f"{path} is not a {expected_format} file")
    if obj.get("version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer scvi-scale (format v{obj['version']}); upgrade to read it")
    return obj
