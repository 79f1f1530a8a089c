"""Process-group set-up, the DDP wrap, and the few collective operations the training loop needs.

A :class:`DistContext` says who this process is (``rank`` of ``world_size``) and which device it trains on.
``DistContext.single()`` is the plain one-process case: every collective is a no-op there, so the loop calls
them unconditionally. ``DistContext.from_env()`` reads what ``torchrun`` and Ray Train set (``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and joins the process group (gloo on CPU,
nccl on GPU) unless Ray already did.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "wrap_model"]

log = logging.getLogger(__name__)


@dataclass
class DistContext:
    """This process's place in a data-parallel job.

    Attributes
    ----------
    rank, world_size, local_rank
        Global rank, number of processes, and rank on this node (picks the GPU).
    device
        Where this process trains (``cuda:<local_rank>`` on GPU nodes, else ``cpu``).
    owns_group
        Whether :meth:`shutdown` should destroy the process group (not when Ray created it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @classmethod
    def single(cls, device: str | torch.device = "cpu") -> DistContext:
        """One process, no process group."""
        return cls(device=torch.device(device))

    @classmethod
    def from_env(cls, device: str | None = None, timeout_s: float = 600.0) -> DistContext:
        """Join the process group that ``torchrun`` or Ray Train describe in the environment.

        Parameters
        ----------
        device
            ``"cpu"`` or ``"cuda"``; default: CUDA when available.
        timeout_s
            How long collectives wait for a peer before failing (a dead worker then surfaces as an error).
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        dev = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(dev)
        if world_size == 1:
            return cls(device=dev)
        owns = False
        if not dist.is_initialized():
            backend = "nccl" if use_cuda else "gloo"
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=dt.timedelta(seconds=timeout_s))
            owns = True
        log.debug("rank %d of %d on %s (%s)", rank, world_size, dev, dist.get_backend())
        return cls(rank, world_size, local_rank, dev, owns)

    @property
    def is_main(self) -> bool:
        """Rank 0: the process that logs, shows progress and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def _reduce(self, values: list[float] | torch.Tensor, op: Any) -> torch.Tensor:
        t = torch.as_tensor(values, dtype=torch.float64).clone()
        if self.distributed:
            on = t.to(self.device) if dist.get_backend() == "nccl" else t
            dist.all_reduce(on, op=op)
            t = on.cpu()
        return t

    def sum(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise sum over ranks of a float64 vector (a copy; the input is not changed)."""
        return self._reduce(values, dist.ReduceOp.SUM)

    def max(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """Element-wise maximum over ranks (e.g. the slowest rank's stage times)."""
        return self._reduce(values, dist.ReduceOp.MAX)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """``obj`` as rank ``src`` has it, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def shutdown(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self.owns_group = False


def wrap_model(model: nn.Module, ctx: DistContext, sync_batchnorm: bool = True) -> nn.Module:
    """The module the loop trains: ``model`` itself in one process, else a DDP wrapper around it.

    With ``sync_batchnorm``, batch normalisation uses the statistics of the global minibatch (all ranks),
    as one process fed the same global batch would: torch's ``SyncBatchNorm`` on GPU, our
    :class:`~scvi_scale.dist.syncbn.GlobalBatchNorm1d` on CPU (torch's needs CUDA). The swap keeps every
    parameter and buffer name, so checkpoints and ``model.state_dict()`` are unchanged. The model builds
    no module it does not use, so DDP runs without ``find_unused_parameters``.
    """
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if sync_batchnorm:
        if ctx.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            from scvi_scale.dist.syncbn import convert_global_batchnorm

            model = convert_global_batchnorm(model)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)
