"""Worker bodies for test_dist_verbs.py: run in 2 spawned gloo processes.

Every rank builds the same small model from a seed and trains it on its half of a global batch in
one layout (DDP, FSDP2, DeepSpeed ZeRO-2/3); the same rank also trains a plain reference copy on the
whole batch in this one process, doing the "same" edits on full tensors. The layout-independent
verbs of dist_sparse.distributed (mul_param_, mul_optimizer_state_, mask_grad_, add_grad_,
full_state_dict) must keep the two runs equal. Any mismatch raises (mp.spawn re-raises it).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from dist_sparse import distributed as D

LR = 0.05
PER_RANK = 4
ATOL = 1e-5


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _model(dtype: torch.dtype = torch.float32) -> nn.Module:
    """Odd shapes (7x5, 7, 3x7, 3) that 2 ranks cannot split evenly, plus a float and an int buffer."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    m.register_buffer("tag", torch.arange(3, dtype=torch.float32) + 0.5)
    m.register_buffer("count", torch.tensor([3, 1], dtype=torch.int64))
    return m.to(dtype)


def _data(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(PER_RANK * world, 5, generator=g), torch.randn(PER_RANK * world, 3, generator=g)


def _edits(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Seeded full-shaped masks / increments per parameter name, identical on every rank."""
    g = torch.Generator().manual_seed(2)
    out = {}
    for name, p in model.named_parameters():
        shape = p.shape
        w = torch.rand(shape, generator=g) > 0.4
        s = torch.rand(shape, generator=g) > 0.3
        delta = torch.randn(shape, generator=g) * 0.1
        out[name] = {"w": w, "s": s, "delta": delta * w, "delta2": torch.randn(shape, generator=g) * 0.1}
    return out


def _make_opt(kind: str, params) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=0.01)
    return torch.optim.AdamW(params, lr=LR, weight_decay=0.1)


STATE_KEYS = {"sgd": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq"]}


class Run:
    """One training run: how to step it and where its parameters are."""

    def __init__(self, forward: Callable, backward: Callable, step: Callable, module: nn.Module,
                 params: dict[str, torch.Tensor], optimizer: Any, before_edit: Callable | None = None) -> None:
        self.forward, self.backward, self.step = forward, backward, step
        self.module, self.params, self.optimizer = module, params, optimizer
        self.before_edit = before_edit or (lambda: None)


def _reference(kind: str, world: int) -> Run:
    model = _model()
    opt = _make_opt(kind, model.parameters())
    x, y = _data(world)

    def backward():
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(x), y).backward()

    return Run(model, backward, opt.step, model, dict(model.named_parameters()), opt)


def _check_state_dict(got: dict, ref: nn.Module, where: str, dtype: torch.dtype | None = None) -> None:
    want = ref.state_dict()
    assert list(got) == list(want), f"{where}: keys {list(got)} != {list(want)}"
    for k, v in want.items():
        assert got[k].device.type == "cpu" and not isinstance(got[k], D.DTensor), f"{where} {k}"
        if dtype is not None and v.is_floating_point():
            assert got[k].dtype == dtype, f"{where} {k}: {got[k].dtype}"
        torch.testing.assert_close(got[k].to(v.dtype), v, rtol=0, atol=ATOL, msg=lambda m: f"{where} {k}: {m}")


def _scenario(run: Run, ref: Run, kind: str, where: str) -> None:
    """Step, edit (state, weights, grads), step, add to grads, step; compare with the reference."""
    edits = _edits(ref.module)
    world, rank = D.world_size(), D.rank()
    # 1. one ordinary step: the optimizer state exists afterwards
    for r in (run, ref):
        r.backward()
        r.step()
    _check_state_dict(D.full_state_dict(run.module), ref.module, f"{where} after step 1")
    # 2. scale the optimizer state: the keys that exist, the right entries
    for name, p in run.params.items():
        keys = D.mul_optimizer_state_(p, run.optimizer, edits[name]["s"])
        every = [keys]
        if world > 1:
            every = [None] * world
            dist.all_gather_object(every, keys)
        assert all(k in ([], STATE_KEYS[kind]) for k in every) and STATE_KEYS[kind] in every, \
            f"{where} {name}: state keys per rank {every}"
        st = ref.optimizer.state[ref.params[name]]
        for key in STATE_KEYS[kind]:
            st[key].mul_(edits[name]["s"])
    # 3. zero weights (and the DeepSpeed master) where the weight mask is 0
    run.before_edit()
    for name, p in run.params.items():
        D.mul_param_(p, edits[name]["w"])
        with torch.no_grad():
            ref.params[name].mul_(edits[name]["w"])
    for master in (True, False):
        sd = D.full_state_dict(run.module, fp32_master=master)
        for name in run.params:
            assert not sd[name][~edits[name]["w"]].any(), f"{where} {name}: masked weight non-zero (master={master})"
    _check_state_dict(D.full_state_dict(run.module), ref.module, f"{where} after mul_param_")
    # 4. masked gradients plus a masked increment: masked weights stay exactly 0 after the step
    for name, p in run.params.items():
        if name.endswith("weight"):  # zero the state where the weight is masked too: nothing moves it
            D.mul_optimizer_state_(p, run.optimizer, edits[name]["w"])
            for key in STATE_KEYS[kind]:
                ref.optimizer.state[ref.params[name]][key].mul_(edits[name]["w"])
    run.backward()
    ref.backward()
    for name, p in run.params.items():
        D.mask_grad_(p, edits[name]["w"])
        D.add_grad_(p, edits[name]["delta"])
        with torch.no_grad():
            ref.params[name].grad.mul_(edits[name]["w"]).add_(edits[name]["delta"])
    run.step()
    ref.step()
    for master in (True, False):
        sd = D.full_state_dict(run.module, fp32_master=master)
        for name in run.params:
            if name.endswith("weight"):
                assert not sd[name][~edits[name]["w"]].any(), \
                    f"{where} {name}: a masked weight came back after the step (master={master})"
    _check_state_dict(D.full_state_dict(run.module), ref.module, f"{where} after masked step")
    # 5. add an arbitrary full tensor to the gradient: the step equals the one-process step
    run.backward()
    ref.backward()
    for name, p in run.params.items():
        D.add_grad_(p, edits[name]["delta2"])
        with torch.no_grad():
            ref.params[name].grad.add_(edits[name]["delta2"])
    run.step()
    ref.step()
    _check_state_dict(D.full_state_dict(run.module), ref.module, f"{where} after add_grad_ step")
    x, _ = _data(world)
    xs = x[PER_RANK * rank:PER_RANK * (rank + 1)]
    with torch.no_grad():
        torch.testing.assert_close(run.forward(xs).float(), ref.forward(xs), rtol=0, atol=ATOL,
                                   msg=lambda m: f"{where} forward after the edits: {m}")


def _local_batch(world: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _data(world)
    return x[PER_RANK * rank:PER_RANK * (rank + 1)], y[PER_RANK * rank:PER_RANK * (rank + 1)]


# -------------------------------------------------------------------------------- DDP and FSDP2


def _torch_run(model: nn.Module, inner: nn.Module, kind: str, world: int, rank: int) -> Run:
    opt = _make_opt(kind, model.parameters())
    xs, ys = _local_batch(world, rank)

    def backward():
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(model(xs), ys).backward()

    return Run(model, backward, opt.step, model, dict(inner.named_parameters()), opt)


def _check_add_grad_creates(p: torch.Tensor, where: str) -> None:
    """add_grad_ on a parameter without a gradient creates it (a DTensor for an FSDP2 parameter)."""
    saved = p.grad
    p.grad = None
    full = torch.arange(D.full_numel(p), dtype=torch.float32).reshape(p.shape)
    keep = full.clone()
    D.add_grad_(p, full)
    assert isinstance(p.grad, D.DTensor) == isinstance(p, D.DTensor), f"{where}: grad type {type(p.grad)}"
    if isinstance(p, D.DTensor):
        assert p.grad.placements == p.placements and p.grad.to_local().shape == p.to_local().shape, where
    assert torch.equal(D.full_grad(p), full), f"{where}: created grad"
    D.add_grad_(p, full)
    assert torch.equal(D.full_grad(p), 2 * full) and torch.equal(full, keep), f"{where}: added grad"
    p.grad = saved


def part_torch(rank: int, world: int) -> None:
    """DDP and FSDP2 verbs (SGD momentum, AdamW), global_sum, broadcast_buffers."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel as DDP

    mesh = init_device_mesh("cpu", (world,))
    for kind in ("sgd", "adamw"):
        inner = _model()
        _scenario(_torch_run(DDP(inner), inner, kind, world, rank), _reference(kind, world), kind, f"ddp {kind}")
        fs = _model()
        fully_shard(fs, mesh=mesh)
        run = _torch_run(fs, fs, kind, world, rank)
        assert all(D.layout(p) == "dtensor" for p in run.params.values())
        _scenario(run, _reference(kind, world), kind, f"fsdp2 {kind}")
        if kind == "adamw":
            _check_add_grad_creates(run.params["0.weight"], "fsdp2")
            _check_mismatched_state(run.params["0.weight"], run.optimizer)
    _check_global_sum(rank, world)
    _check_broadcast_buffers(rank, world)


def _check_mismatched_state(p: torch.Tensor, opt: torch.optim.Optimizer) -> None:
    """A plain full-shaped state tensor of a sharded parameter cannot be scaled: RuntimeError naming it."""
    st = opt.state[p]
    saved = st["exp_avg"]
    st["exp_avg"] = torch.ones(p.shape)
    try:
        D.mul_optimizer_state_(p, opt, torch.ones(p.shape))
    except RuntimeError as err:
        assert "'exp_avg'" in str(err), str(err)
    else:
        raise AssertionError("mul_optimizer_state_ accepted a state whose local shape is not the parameter's")
    finally:
        st["exp_avg"] = saved


# -------------------------------------------------------------------------------- global_sum


def _polar(h: torch.Tensor, n: int, total: torch.Tensor | None = None) -> torch.Tensor:
    """A polarization-like term of the global mean activation vector m: (|m|^2 - 0.5)^2 + sum log(1 + m^2)."""
    m = (h.sum(0) if total is None else total) / n
    return (m.square().sum() - 0.5).square() + torch.log1p(m.square()).sum()


def _check_global_sum(rank: int, world: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    n = PER_RANK * world
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    torch.manual_seed(4)
    ref = nn.Linear(5, 3).double()
    h = ref(x)
    (nn.functional.mse_loss(h, y) + _polar(h, n)).backward()
    xs, ys = x[PER_RANK * rank:PER_RANK * (rank + 1)], y[PER_RANK * rank:PER_RANK * (rank + 1)]
    for wrap in ("ddp", "manual"):
        torch.manual_seed(4)
        lin = nn.Linear(5, 3).double()
        model = DDP(lin) if wrap == "ddp" else lin
        hs = model(xs)
        loss = nn.functional.mse_loss(hs, ys) + _polar(hs, n, D.global_sum(hs.sum(0)))
        loss.backward()
        if wrap == "manual":  # what every backend does: average the gradients over ranks
            for p in lin.parameters():
                dist.all_reduce(p.grad)
                p.grad /= world
        for (name, p), q in zip(lin.named_parameters(), ref.parameters()):
            diff = float((p.grad - q.grad).abs().max())
            assert diff <= 1e-6, f"global_sum {wrap} {name}: gradient differs from one process by {diff}"
    # forward value
    s = D.global_sum(torch.tensor([float(rank + 1)], dtype=torch.float64))
    assert float(s) == world * (world + 1) / 2


# -------------------------------------------------------------------------------- broadcast_buffers


def _check_broadcast_buffers(rank: int, world: int) -> None:
    for src in (0, world - 1):
        m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.BatchNorm1d(4))
        m.register_buffer("flags", torch.tensor([rank % 2 == 0, True, rank == 1]))
        with torch.no_grad():
            for i, bn in enumerate((m[1], m[2])):
                bn.running_mean.fill_(rank + i)
                bn.running_var.fill_(10.0 * rank + 1)
                bn.num_batches_tracked.fill_(7 * rank + i)
        w = m[0].weight.detach().clone()
        count = D.broadcast_buffers(m, src=src)
        assert count == 7, count
        for i, bn in enumerate((m[1], m[2])):
            assert torch.equal(bn.running_mean, torch.full((4,), float(src + i))), (src, bn.running_mean)
            assert torch.equal(bn.running_var, torch.full((4,), 10.0 * src + 1)), (src, bn.running_var)
            assert int(bn.num_batches_tracked) == 7 * src + i and bn.num_batches_tracked.dtype == torch.int64
        assert torch.equal(m.flags, torch.tensor([src % 2 == 0, True, src == 1])) and m.flags.dtype == torch.bool
        assert torch.equal(m[0].weight, w), "parameters must not be touched"
        D.assert_same_across_ranks(torch.cat([b.double().reshape(-1) for b in m.buffers()]), "buffers")


# -------------------------------------------------------------------------------- DeepSpeed


def _ds_run(stage: int, kind: str, world: int, rank: int, bf16: bool = False) -> Run:
    import deepspeed

    model = _model()
    cfg = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1,
           "gradient_clipping": 0.0, "steps_per_print": 10 ** 9, "zero_allow_untested_optimizer": True,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 10,
                                 "stage3_max_reuse_distance": 0, "stage3_prefetch_bucket_size": 0},
           "bf16": {"enabled": bf16}}
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=_make_opt(kind, model.parameters()),
                                             config=cfg)
    xs, ys = _local_batch(world, rank)
    dtype = torch.bfloat16 if bf16 else torch.float32

    def backward():
        engine.backward(nn.functional.mse_loss(engine(xs.to(dtype)).float(), ys))

    return Run(engine, backward, engine.step, engine, dict(engine.module.named_parameters()), opt)


def _check_zero3_presence(run: Run) -> None:
    """Both ZeRO-3 cases are edited: partitioned weights (data released) and persistent biases (data kept)."""
    present = {n: p.data.numel() > 0 for n, p in run.params.items()}
    assert present == {"0.weight": False, "0.bias": True, "2.weight": False, "2.bias": True}, present


def _check_bf16_master(stage: int, world: int, rank: int) -> None:
    """Under bf16, full_state_dict returns the fp32 master weights (and the bf16 weights without fp32_master);
    masked weights stay 0 in both through a step."""
    run = _ds_run(stage, "sgd", world, rank, bf16=True)
    for _ in range(2):
        run.backward()
        run.step()
    master = D.full_state_dict(run.module)
    low = D.full_state_dict(run.module, fp32_master=False)
    assert list(master) == list(low) == list(_model().state_dict())
    finer = 0
    for name in run.params:
        assert master[name].dtype == torch.float32 and low[name].dtype == torch.bfloat16, name
        assert torch.equal(master[name].to(torch.bfloat16), low[name]), f"zero{stage} bf16 {name}: lp != round(master)"
        finer += int((master[name] != master[name].to(torch.bfloat16).float()).sum())
    assert finer > 0, f"zero{stage} bf16: the 'master' values are all bf16-representable - not the fp32 copy"
    assert torch.equal(master["count"], torch.tensor([3, 1]))
    assert torch.equal(master["tag"].float(), torch.arange(3.0) + 0.5)  # buffers as they are (cast with the model)
    # the masking verbs under bf16: the bf16 weight and its fp32 master stay 0 through a step
    edits = _edits(_model())
    for name, p in run.params.items():
        D.mul_param_(p, edits[name]["w"])
        D.mul_optimizer_state_(p, run.optimizer, edits[name]["w"])
    run.backward()
    for name, p in run.params.items():
        D.mask_grad_(p, edits[name]["w"])
        D.add_grad_(p, edits[name]["delta"])
    run.step()
    for fp32 in (True, False):
        sd = D.full_state_dict(run.module, fp32_master=fp32)
        for name in run.params:
            assert not sd[name][~edits[name]["w"]].any(), f"zero{stage} bf16 {name}: masked weight moved ({fp32})"


def part_deepspeed(rank: int, world: int) -> None:
    """ZeRO-1 (SGD momentum), ZeRO-2 and ZeRO-3 (SGD momentum, AdamW) verbs; bf16 master weights."""
    import importlib

    import deepspeed

    # (``import deepspeed.comm.torch as m`` binds the real torch package: deepspeed.comm imports torch)
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    # skip the JIT build of DeepSpeed's CPU shared-memory all-reduce kernel (~40 s; see _stats_worker)
    ds_torch_comm.build_shm_op = lambda: None
    # deepspeed.initialize imports its Muon optimizer, whose @torch.compile decorators import inductor
    # (~6 s per process); Muon is not used here, so let those decorators be the identity
    ds_compiler = importlib.import_module("deepspeed.runtime.compiler")
    ds_compiler.compile = lambda: ds_compiler.dummy_decorator
    deepspeed.init_distributed(dist_backend="gloo")
    for stage in (1, 2, 3):
        for kind in ("sgd",) if stage == 1 else ("sgd", "adamw"):  # ZeRO-1 shares ZeRO-2's code path
            run = _ds_run(stage, kind, world, rank)
            where = f"zero{stage} {kind}"
            lay = {D.layout(p) for p in run.params.values()}
            assert lay == ({"zero3"} if stage == 3 else {"plain"}) and all(
                D.is_deepspeed_param(p) for p in run.params.values()), f"{where}: {lay}"
            if stage == 3:
                run.before_edit = lambda run=run: _check_zero3_presence(run)
            _scenario(run, _reference(kind, world), kind, where)
        _check_bf16_master(stage, world, rank)


PARTS: dict[str, Callable[[int, int], None]] = {"torch": part_torch, "deepspeed": part_deepspeed}


def worker(rank: int, world: int, port: int, parts: list[str], done_dir: str | None = None) -> None:
    """Run the named parts in one process group (one spawn: process start-up dominates the cost).

    After each part rank 0 writes ``<done_dir>/<part>.ok``, so a failure can be told apart per part.
    """
    _init(rank, world, port)
    try:
        for part in parts:
            PARTS[part](rank, world)
            dist.barrier()
            if done_dir and rank == 0:
                open(os.path.join(done_dir, f"{part}.ok"), "w").close()
    finally:
        dist.destroy_process_group()
