"""model.sync_bn on CPU/gloo: one DDP step of a BatchNorm ResNet-20 on 2 processes equals one step of the
plain BatchNorm net on the global batch in one process (outputs, loss, gradients, running stats)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import free_port

pytestmark = pytest.mark.multiproc
BATCH = 12


def _net() -> nn.Module:
    from dist_sparse.models import create_model

    torch.manual_seed(0)
    return create_model("resnet20", num_classes=3, in_chans=2, img_size=8, width_mult=0.25).double()


def _data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(BATCH, 2, 8, 8, generator=g, dtype=torch.float64) * 3 + 1, torch.randint(0, 3, (BATCH,), generator=g)


def _step(model, x, y):
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    loss.backward()
    return out.detach(), loss.detach()


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from dist_sparse.models.norms import GlobalBatchNorm, convert_sync_batchnorm

        model = convert_sync_batchnorm(_net(), use_torch=False)
        assert sum(isinstance(m, GlobalBatchNorm) for m in model.modules()) == 19  # every BatchNorm of ResNet-20
        ddp = nn.parallel.DistributedDataParallel(model)
        x, y = _data()
        per = BATCH // world
        out, loss = _step(ddp, x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per])
        dist.all_reduce(loss)
        outs = [torch.zeros_like(out) for _ in range(world)]
        dist.all_gather(outs, out)
        torch.save({"out": torch.cat(outs), "loss": loss / world,
                    "grads": {n: p.grad for n, p in model.named_parameters()},
                    "buffers": {n: b for n, b in model.named_buffers()}}, os.path.join(out_dir, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_two_processes_equal_one_process_on_the_global_batch(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ref = _net()
    x, y = _data()
    out, loss = _step(ref, x, y)
    for r in (0, 1):
        got = torch.load(tmp_path / f"r{r}.pt", weights_only=True)
        assert (got["out"] - out).abs().max() <= 1e-5
        assert abs(float(got["loss"] - loss)) <= 1e-5
        for n, p in ref.named_parameters():
            assert (got["grads"][n] - p.grad).abs().max() <= 1e-5, n
        for n, b in ref.named_buffers():
            assert torch.allclose(got["buffers"][n].to(b.dtype), b, atol=1e-5), n


def test_without_sync_the_two_differ():
    """The check above can fail: per-rank BatchNorm statistics give other outputs than global ones."""
    ref = _net()
    x, y = _data()
    full, _ = _step(ref, x, y)
    halves = torch.cat([_net()(x[:6]), _net()(x[6:])]).detach()
    assert (halves - full).abs().max() > 1e-3


def test_convert_keeps_state_dict_names_and_single_process_behaviour():
    from dist_sparse.models.norms import convert_sync_batchnorm

    ref = _net()
    conv = convert_sync_batchnorm(_net(), use_torch=False)
    assert ref.state_dict().keys() == conv.state_dict().keys()
    x, _ = _data()
    assert torch.equal(ref(x), conv(x))  # one process: exactly BatchNorm
