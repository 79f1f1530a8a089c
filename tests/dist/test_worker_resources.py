"""CPUs a Ray worker asks for: a cluster's head must not size the workers from its own core count."""

from __future__ import annotations

import os

import pytest

from scvi_scale.config import ConfigError, TrainConfig
from scvi_scale.dist.launch import _worker_cpus
from scvi_scale.store.errors import InputError


def test_local_ray_shares_this_machines_cores() -> None:
    assert _worker_cpus(None, 2, None) == max(0.25, (os.cpu_count() or 1) / 2)
    assert _worker_cpus(None, 64, "local") == 0.25


@pytest.mark.parametrize("address", ["auto", "ray://head:10001"])
def test_cluster_workers_ask_for_one_cpu_unless_told(address: str) -> None:
    assert _worker_cpus(None, 4, address) == 1.0
    assert _worker_cpus(6, 4, address) == 6.0


def test_bad_cpus_per_worker_is_refused() -> None:
    with pytest.raises(InputError, match="cpus_per_worker"):
        _worker_cpus(0, 2, "auto")
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        TrainConfig(cpus_per_worker=-1)
