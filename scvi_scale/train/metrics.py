"""Per-epoch metrics: flat dicts with slash names, appended to ``metrics.csv`` (and TensorBoard if installed)."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

COLUMNS = [
    "epoch",
    "step",
    "kl_weight",
    "train/loss",
    "train/elbo",
    "train/reconstruction_loss",
    "train/kl_local",
    "validation/loss",
    "validation/elbo",
    "validation/reconstruction_loss",
    "validation/kl_local",
    "perf/cells_per_s",
    "perf/epoch_s",
    "perf/step_s",
    "perf/data_s",
    "perf/idle_s",
    "perf/read_s",
    "perf/decode_s",
    "perf/assemble_s",
    "perf/h2d_s",
    "world_size",
]


class MetricsLog:
    """Appends one row per epoch to ``run_dir/metrics.csv``; mirrors it to TensorBoard when available."""

    def __init__(self, run_dir: str | Path | None, tensorboard: bool = True) -> None:
        self.path = Path(run_dir) / "metrics.csv" if run_dir is not None else None
        self.rows: list[dict[str, Any]] = []
        self._tb = None
        if self.path is not None and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
            except ImportError:
                log.debug("tensorboard not installed; metrics go to metrics.csv only")

    def truncate(self, before_epoch: int) -> None:
        """On resume: drop rows of epochs that will be re-run, keeping the file consistent."""
        if self.path is None or not self.path.exists():
            return
        with self.path.open(newline="") as fh:
            kept = [r for r in csv.DictReader(fh) if int(r["epoch"]) < before_epoch]
        self.rows = [{k: _num(v) for k, v in r.items()} for r in kept]
        self._rewrite()

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path is None:
            return
        new = not self.path.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
        if self._tb is not None:
            for k, v in row.items():
                if k not in ("epoch", "step") and isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, int(row["epoch"]))
            self._tb.flush()

    def _rewrite(self) -> None:
        with self.path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: row.get(k, "") for k in COLUMNS})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _num(v: str) -> Any:
    if v == "":
        return float("nan")
    try:
        f = float(v)
    except ValueError:
        return v
    return int(f) if f.is_integer() and "." not in v and "e" not in v.lower() else f
