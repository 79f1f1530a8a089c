"""Launchers: run one worker function on N processes (local spawn) or N Ray Train workers.

Every launcher ends in the same place: each worker process has ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` (or a
process group Ray set up) and calls ``entry(payload)``, which builds a :class:`~scvi_scale.dist.DistContext`
and runs the one training loop. ``torchrun`` needs no launcher here: it starts the processes itself and the
CLI reads its environment.

``payload`` must be picklable (plain data: paths, config dicts); ``entry`` must be importable by module name
in the workers (a function of the installed package, never one defined in ``__main__`` or a test file).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

from scvi_scale.store.errors import InputError

__all__ = ["LAUNCHERS", "launch", "ray_session", "ray_storage"]

log = logging.getLogger(__name__)

LAUNCHERS = ("local", "torchrun", "ray")
# quieter, faster Ray on small clusters and CI (see deploy/SCALING.md); set only when the user has not
_RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _local_worker(rank: int, world_size: int, port: int, entry: Callable[[Any], Any], payload: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    entry(payload)


def _launch_local(workers: int, entry: Callable[[Any], Any], payload: Any) -> None:
    import torch.multiprocessing as mp

    try:
        mp.start_processes(
            _local_worker, args=(workers, _free_port(), entry, payload), nprocs=workers, start_method="spawn"
        )
    except mp.ProcessRaisedException as exc:
        _reraise_worker_error(str(exc), exc)
    except mp.ProcessExitedException as exc:
        raise RuntimeError(f"a training worker died ({exc}); resume from the run's last checkpoint") from exc


def _reraise_worker_error(text: str, exc: BaseException) -> None:
    """A worker's one-line ``InputError`` (bad input reaches every rank alike) as our own; else a RuntimeError."""
    for line in reversed(text.strip().splitlines()):
        if "InputError: " in line:
            raise InputError(line.split("InputError: ", 1)[1].strip()) from None
    last = text.strip().splitlines()[-1] if text.strip() else repr(exc)
    raise RuntimeError(f"a training worker failed: {last}") from exc


def ray_storage(storage_path: str | None) -> tuple[str | None, Any]:
    """Ray's ``storage_path`` and ``storage_filesystem`` for a local path or an object-store URL.

    ``s3://bucket/prefix`` goes through s3fs with the same endpoint and keys as the stores (the native pyarrow
    S3 filesystem failed against S3-compatible test servers); local paths are made absolute.
    """
    if storage_path is None:
        return None, None
    if "://" not in storage_path or storage_path.startswith("file://"):
        return os.path.abspath(storage_path.removeprefix("file://")), None
    scheme, rest = storage_path.split("://", 1)
    if scheme not in ("s3", "s3a"):
        return storage_path, None
    import pyarrow.fs
    import s3fs

    from scvi_scale.store.open import s3_settings

    settings = s3_settings(None)
    fs = s3fs.S3FileSystem(
        key=settings.key,
        secret=settings.secret,
        token=settings.token,
        endpoint_url=settings.endpoint_url,
        client_kwargs={"region_name": settings.region} if settings.region else None,
    )
    return rest, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Use the running Ray, else start one (``address`` None/``"local"``: here; ``"auto"``/``"ray://..."``: join a
    cluster) with our quieter defaults, and shut it down afterwards only if we started it."""
    import ray

    for key, value in _RAY_ENV.items():
        os.environ.setdefault(key, value)
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if address in (None, "local"):
            kwargs["num_cpus"] = os.cpu_count()
        else:
            kwargs["address"] = address
        ray.init(**kwargs)
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _ray_worker(config: dict[str, Any]) -> None:
    config["entry"](config["payload"])


def _worker_cpus(cpus_per_worker: float | None, workers: int, address: str | None) -> float:
    """CPUs each Ray worker asks for: as configured; on a Ray started here, this machine's cores shared evenly;
    on a cluster, 1 (this process may run on a head whose core count says nothing about the worker nodes, and
    asking for more than a worker node has would leave the job pending forever)."""
    if cpus_per_worker is not None:
        if cpus_per_worker <= 0:
            raise InputError(f"train.cpus_per_worker must be > 0; got {cpus_per_worker}")
        return float(cpus_per_worker)
    if address in (None, "local"):
        return max(0.25, (os.cpu_count() or 1) / workers)
    return 1.0


def _launch_ray(
    workers: int,
    entry: Callable[[Any], Any],
    payload: Any,
    *,
    gpus_per_worker: float,
    cpus_per_worker: float | None,
    address: str | None,
    storage_path: str | None,
    max_failures: int,
    name: str,
) -> Any:
    try:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer
    except ImportError as exc:
        raise InputError(
            f"--launcher ray needs Ray Train ({exc}); install the ray extra: pip install 'scvi-scale[ray]'"
        ) from None
    with ray_session(address):
        path, fs = ray_storage(storage_path)
        use_gpu = gpus_per_worker > 0
        resources: dict[str, float] = {}
        if use_gpu:
            resources["GPU"] = gpus_per_worker
        resources["CPU"] = _worker_cpus(cpus_per_worker, workers, address)
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"entry": entry, "payload": payload},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
            run_config=RunConfig(
                name=name,
                storage_path=path,
                storage_filesystem=fs,
                failure_config=FailureConfig(max_failures=max_failures, controller_failure_limit=1),
            ),
        )
        try:
            return trainer.fit()
        except Exception as exc:  # Ray wraps worker errors (TrainingFailedError, WorkerGroupError)
            _reraise_worker_error(str(exc), exc)


def launch(
    launcher: str,
    workers: int,
    entry: Callable[[Any], Any],
    payload: Any,
    *,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float | None = None,
    address: str | None = None,
    storage_path: str | None = None,
    max_failures: int = 2,
    name: str = "scvi-scale",
) -> Any:
    """Run ``entry(payload)`` on ``workers`` processes and wait for all of them.

    Parameters
    ----------
    launcher
        ``"local"``: spawn the processes on this machine (gloo on CPU); ``"ray"``: Ray Train's
        ``TorchTrainer`` on the cluster at ``address`` (``None``/``"local"``: start a local Ray instance;
        ``"auto"`` or ``"ray://host:10001"``: join one). ``"torchrun"`` is refused here: torchrun starts the
        processes itself (``torchrun --nproc_per_node N -m scvi_scale train ...``).
    workers
        Number of training processes (one per GPU on GPU nodes).
    gpus_per_worker, cpus_per_worker
        Ray resources per worker (CPU default: on a Ray started here, this machine's cores shared evenly; on a
        cluster, 1).
    storage_path
        Ray's run storage (local path or ``s3://``) for its checkpoints and results.
    max_failures
        Ray restarts the worker group this many times after a worker dies; training resumes from the last
        checkpoint.
    """
    if launcher not in LAUNCHERS:
        raise InputError(f"unknown launcher {launcher!r}; choose one of {', '.join(LAUNCHERS)}")
    if workers < 1:
        raise InputError(f"--workers must be >= 1; got {workers}")
    if launcher == "torchrun":
        raise InputError(
            "torchrun starts the worker processes itself: run `torchrun --nproc_per_node N -m scvi_scale train ...`"
        )
    if launcher == "ray":
        return _launch_ray(
            workers,
            entry,
            payload,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            address=address,
            storage_path=storage_path,
            max_failures=max_failures,
            name=name,
        )
    if workers == 1:
        return entry(payload)
    _launch_local(workers, entry, payload)
    return None
