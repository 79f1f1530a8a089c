"""Global batch norm over 2 real gloo processes equals batch norm over the concatenated batch in one process."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from scvi_scale.dist import DistContext, wrap_model
from scvi_scale.dist.syncbn import GlobalBatchNorm1d

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5, momentum=0.01, eps=1e-3), nn.ReLU(), nn.Linear(5, 1))


def _data() -> torch.Tensor:
    return torch.randn(2 * 12, 6, generator=torch.Generator().manual_seed(3)) * 3 + 1


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    ctx = DistContext.from_env(device="cpu")
    try:
        net = _net()
        ddp = wrap_model(net, ctx)
        assert isinstance(net[1], GlobalBatchNorm1d)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x = _data()
        for _ in range(3):  # rank r trains on its half of the global batch
            opt.zero_grad()
            ddp(x[rank * 12 : (rank + 1) * 12]).pow(2).mean().backward()
            opt.step()
        sums = ctx.sum([float(rank + 1), 2.0])
        if ctx.is_main:
            torch.save({"state": net.state_dict(), "sums": sums}, out)
    finally:
        ctx.shutdown()


@pytest.mark.timeout(180)
def test_two_ranks_equal_one_process_on_the_global_batch(tmp_path) -> None:
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, start_method="spawn")
    got = torch.load(out, weights_only=True)
    assert got["sums"].tolist() == [3.0, 4.0]
    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        ref(_data()).pow(2).mean().backward()
        opt.step()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(got["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    # and the statistics moved: the check would pass vacuously if batch norm had been skipped
    assert not torch.allclose(got["state"]["1.running_mean"], torch.zeros(5))


def test_eval_mode_and_single_process_are_plain_batch_norm() -> None:
    bn = nn.BatchNorm1d(4)
    g = GlobalBatchNorm1d(4)
    g.load_state_dict(bn.state_dict())
    x = torch.randn(10, 4)
    torch.testing.assert_close(g(x), bn(x))  # no process group: plain batch norm
    g.eval(), bn.eval()
    torch.testing.assert_close(g(x), bn(x))
    assert DistContext.single().sum([1.0, 2.0]).tolist() == [1.0, 2.0]
    assert wrap_model(bn, DistContext.single()) is bn
