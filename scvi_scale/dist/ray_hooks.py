"""What a Ray Train worker adds to the one training loop: report each epoch (and its checkpoint) to Ray, and
find the checkpoint Ray kept after a restart.

Our own checkpoint (``RUN/checkpoints/last.pt``, atomic, also written mid-epoch) stays the source of truth;
Ray gets a copy at every epoch end, in its ``storage_path`` (local or object storage), so a worker group
restarted on other nodes can resume even when the run directory is not shared.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scvi_scale.dist.context import DistContext

__all__ = ["report_epoch", "restored_checkpoint"]


def report_epoch(ctx: DistContext, run_dir: Path | None) -> Callable[[dict[str, Any]], None]:
    """An ``on_epoch_end`` hook: every rank reports the epoch's metrics; rank 0 attaches ``last.pt``."""
    import ray.train

    def hook(row: dict[str, Any]) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        last = run_dir / "checkpoints" / "last.pt" if run_dir is not None else None
        if ctx.is_main and last is not None and last.exists():
            with tempfile.TemporaryDirectory(prefix="scvi-scale-ckpt-") as tmp:
                shutil.copy2(last, Path(tmp) / "last.pt")
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)

    return hook


def restored_checkpoint(run_dir: Path) -> Path | None:
    """After a restart, Ray's latest reported checkpoint copied to ``run_dir/checkpoints/last.pt`` (or None)."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    target = run_dir / "checkpoints" / "last.pt"
    with ckpt.as_directory() as d:
        src = Path(d) / "last.pt"
        if not src.exists():
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(".last.pt.restoring")
        shutil.copy2(src, tmp)
        tmp.replace(target)
    return target
