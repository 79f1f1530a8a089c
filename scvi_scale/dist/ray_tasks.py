"""Ray task fan-out: run a function over many items as Ray tasks, a bounded number in flight (inference).

Training uses Ray Train's worker group (:mod:`scvi_scale.dist.launch`); embedding needs none of that: every
item (a row region) is an independent, idempotent task, so a task Ray retries after a worker died simply
writes its region again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from scvi_scale.dist.launch import ray_session
from scvi_scale.store.errors import InputError

__all__ = ["ray_map"]


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise InputError(
            f"--launcher ray needs Ray ({exc}); install the ray extra: pip install 'scvi-scale[ray]'"
        ) from None
    return ray


def _reraise(exc: BaseException) -> None:
    """A task's one-line InputError as our own (bad input is the user's to fix); anything else as it came."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, InputError):
        raise InputError(str(cause)) from None
    raise exc


def ray_map(
    fn: Callable[[Any, Any], Any],
    items: Iterable[Any],
    *,
    shared: Any = None,
    max_in_flight: int = 2,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    address: str | None = None,
    max_retries: int = 3,
) -> Iterator[Any]:
    """Yield ``fn(shared, item)`` for every item, computed as Ray tasks, in the order they finish.

    Parameters
    ----------
    fn
        An importable function (of the installed package, not of ``__main__`` or a test file).
    items
        Small, picklable items (e.g. region numbers); consumed lazily.
    shared
        One object every task receives (e.g. the model), put into Ray's object store once.
    max_in_flight
        Tasks submitted and not yet collected at any time: bounds memory and the store's write load.
    num_cpus, num_gpus
        Resources of one task.
    address
        ``None`` or ``"local"``: use the running Ray, or start one here (and stop it at the end); ``"auto"`` or
        ``"ray://host:10001"``: join a cluster.
    max_retries
        Ray resubmits a task whose worker died this many times (tasks must be idempotent).
    """
    ray = _import_ray()
    with ray_session(address):
        remote = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries)(fn)
        shared_ref = ray.put(shared)
        todo, running = iter(items), []
        while True:
            while len(running) < max(1, max_in_flight):
                item = next(todo, _END)
                if item is _END:
                    break
                running.append(remote.remote(shared_ref, item))
            if not running:
                return
            done, running = ray.wait(running, num_returns=1)
            try:
                result = ray.get(done[0])
            except Exception as exc:  # a RayTaskError wraps the task's exception
                for ref in running:
                    ray.cancel(ref)
                _reraise(exc)
            yield result


_END = object()
