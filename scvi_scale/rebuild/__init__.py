"""The nightly atlas rebuild (``scvi-scale rebuild --config atlas.yaml``): ingest new inputs into the store, refresh
its statistics, train (warm-started with batch surgery, or from scratch), evaluate on a fixed held-out set, gate,
re-embed and publish a new version atomically; killed runs resume. See :mod:`scvi_scale.rebuild.run`."""

from __future__ import annotations

from scvi_scale.rebuild.config import RebuildConfig, load_rebuild_config, rebuild_config_from_dict
from scvi_scale.rebuild.run import RebuildResult, rebuild
from scvi_scale.rebuild.versions import RunRoot

__all__ = ["RebuildConfig", "RebuildResult", "RunRoot", "load_rebuild_config", "rebuild", "rebuild_config_from_dict"]
