"""Layout-independent verbs of dist_sparse.distributed on 2 gloo processes and in one process.

Each multi-process case trains a small model (odd shapes, uneven shards) on half a global batch per
rank and a plain reference on the whole batch in the same process, editing both through the verbs:

* DDP and FSDP2 (fully_shard on a CPU mesh), SGD with momentum and AdamW: ``mul_optimizer_state_``
  scales exactly the state entries (returns the keys; a plain state of a sharded parameter raises),
  ``mul_param_`` zeroes exactly the masked weights, ``mask_grad_`` + ``add_grad_`` give the
  one-process step and masked weights stay 0, ``full_state_dict`` equals the reference state dict;
  ``add_grad_`` creates a missing (DTensor) gradient. Then ``global_sum`` (a nonlinear regulariser
  of a global-batch statistic: gradient equal to one process within 1e-6 in float64, with DDP and
  with manual averaging) and ``broadcast_buffers`` (BatchNorm and bool buffers become src's).
* DeepSpeed ZeRO-2 and ZeRO-3 with SGD momentum and AdamW, ZeRO-1 with SGD momentum
  (deepspeed.initialize on gloo; ZeRO-3 biases persistent, weights partitioned): the same scenario
  through the fp32 master / gradient / optimizer-state partitions, and under bf16 ``full_state_dict``
  returns the fp32 master weights (bf16 weights with ``fp32_master=False``).

Run: python -m pytest -q tests/distributed/test_dist_verbs.py
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from dist_sparse import distributed as D
from tests.conftest import free_port
from tests.distributed import _verbs_worker as W
from tests.distributed.test_distributed_stats import _deepspeed_skip_reason as deepspeed_skip_reason

WORLD = 2


@pytest.fixture(scope="module")
def spawned(tmp_path_factory) -> tuple[str, str | None]:
    """Both multi-process parts in ONE spawn (process start-up costs more than the checks).

    Returns (folder with one ``<part>.ok`` per passed part, the error of the spawn or None).
    """
    done = str(tmp_path_factory.mktemp("verbs"))
    parts = ["torch"] + ([] if deepspeed_skip_reason() else ["deepspeed"])
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        mp.spawn(W.worker, args=(WORLD, free_port(), parts, done), nprocs=WORLD, join=True)
    except Exception as err:  # reported by the test of the part that failed
        return done, f"{type(err).__name__}: {err}"
    return done, None


def _check_part(spawned: tuple[str, str | None], part: str) -> None:
    done, error = spawned
    if not os.path.exists(os.path.join(done, f"{part}.ok")):
        pytest.fail(f"the {part} part did not pass (or did not run after an earlier part failed): {error}",
                    pytrace=False)


@pytest.mark.multiproc
def test_verbs_ddp_fsdp2_global_sum_broadcast_buffers(spawned):
    """DDP + FSDP2 verbs with SGD momentum and AdamW, global_sum gradients, broadcast_buffers."""
    _check_part(spawned, "torch")


@pytest.mark.multiproc
def test_verbs_deepspeed_zero1_zero2_zero3(spawned):
    """ZeRO-1/2/3 verbs with SGD momentum (and AdamW for 2, 3); bf16 full_state_dict gives fp32 masters."""
    reason = deepspeed_skip_reason()
    if reason:
        pytest.skip(reason)
    _check_part(spawned, "deepspeed")


# -------------------------------------------------------------------------------- one process


@pytest.fixture
def one_thread():
    assert not torch.distributed.is_initialized()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_single_process_verbs(one_thread):
    """Every verb works without a process group; wrappers (.optimizer) are looked through."""
    kind_states = {"sgd": W.STATE_KEYS["sgd"], "adamw": W.STATE_KEYS["adamw"]}
    for kind in kind_states:
        run, ref = W._reference(kind, 1), W._reference(kind, 1)
        wrapped = types.SimpleNamespace(optimizer=types.SimpleNamespace(optimizer=run.optimizer))
        run = W.Run(run.forward, run.backward, run.step, run.module, run.params, wrapped)
        W._scenario(run, ref, kind, f"single {kind}")
    p = nn.Parameter(torch.ones(2, 3))
    W._check_add_grad_creates(p, "single")
    with pytest.raises(ValueError, match="full shape"):
        D.add_grad_(p, torch.ones(3, 2))
    assert D.mask_grad_ is D.mul_grad_
    assert D.mul_optimizer_state_(p, torch.optim.SGD([p], lr=0.1), torch.zeros(2, 3)) == []  # no state yet


def test_single_process_global_sum_and_buffers(one_thread):
    x = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = D.global_sum(x)
    assert torch.equal(y, x) and y is not x
    (y.square().sum()).backward()
    assert torch.equal(x.grad, 2 * x.detach())
    with pytest.raises(TypeError):
        D.global_sum(3.0)  # type: ignore[arg-type]
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    before = [b.clone() for b in m.buffers()]
    assert D.broadcast_buffers(m) == 3
    assert all(torch.equal(a, b) for a, b in zip(before, m.buffers()))


def test_single_process_full_state_dict_keys(one_thread):
    """Tied parameters under every name, wrapper tokens stripped, CPU copies (not the live tensors)."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.emb.weight
            self.norm = nn.BatchNorm1d(3)

    class Wrap(nn.Module):  # what torch.compile (_orig_mod) / checkpoint wrappers put into the keys
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    inner = Tied()
    sd = D.full_state_dict(Wrap(inner))
    want = inner.state_dict()
    assert list(sd) == list(want)
    for k in want:
        assert torch.equal(sd[k], want[k]) and sd[k].data_ptr() != want[k].data_ptr(), k
    assert sd["emb.weight"] is sd["head.weight"]  # gathered once
    assert D.full_state_dict(nn.Linear(2, 2)).keys() == {"weight", "bias"}
