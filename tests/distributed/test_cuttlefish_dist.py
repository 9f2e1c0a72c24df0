"""Cuttlefish under 2 gloo processes (DDP and FSDP2) against one process with the same global batch.

* the stable-rank histories, converged flags, switch epoch and ranks are identical on both ranks and
  equal to the 1-process run (histories to 1e-9 relative: float64, sums in another order);
* the run trains on after the switch (the model, optimizer and schedule are rebuilt through
  ``run_surgery``) with the same losses as one process, and a run resumed from a checkpoint written
  right after the switch ends like the uninterrupted one;
* the decision path wins over a rank's own copy: with rank 1's weights deliberately perturbed the
  measured stable ranks (and so every decision) are rank 0's on both ranks.

ZeRO-1/2/3 (and DDP, FSDP2) also go through the real trainer and ``launch/run.sh`` with 2 processes
(marked slow, about 2-4 min per backend here): the switch happens at the end of epoch 0 with the same
ranks and parameter count as the same run on one process (same global batch), training goes on, and a
run resumed from the post-switch checkpoint continues in the factorized architecture::

    python -m pytest -q -m slow tests/distributed/test_cuttlefish_dist.py -p no:cacheprovider
"""
from __future__ import annotations

import math
import os
import subprocess
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from tests.conftest import TINY, free_port

pytestmark = pytest.mark.multiproc

GLOBAL_BATCH = 16
STEPS_PER_EPOCH = 3
EPOCHS = 4
# window 2 and a huge threshold: all layers flag at check 2, so the switch is at the end of epoch 1
FIELDS = {"name": "cuttlefish", "window": 2, "last_m": 2, "threshold": 1e6, "rank_metric": "vanilla",
          "eval_batches": 0}


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(12, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 32),
                             nn.Tanh(), nn.Linear(32, 3)).double()


def _method(timing: str = "immediate"):
    from dist_sparse.config import config_from_dict
    from dist_sparse.methods import create_method
    from dist_sparse.methods.base import OptimizerInfo, RunContext

    method = create_method(config_from_dict({"method": {**FIELDS, "switch_timing": timing}}).method, seed=0)
    method.setup(RunContext(total_steps=STEPS_PER_EPOCH * EPOCHS, steps_per_epoch=STEPS_PER_EPOCH,
                            optimizer=OptimizerInfo("sgd", lr=0.1, weight_decay=1e-3, momentum=0.9)))
    return method


def _batch(step: int):
    g = torch.Generator().manual_seed(900 + step)
    return torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64), torch.randint(0, 3, (GLOBAL_BATCH,),
                                                                                          generator=g)


class _Loop:
    """A tiny training loop: plain, DDP or FSDP2; rebuilds through run_surgery like the trainer."""

    def __init__(self, mode: str, rank: int, world: int, method, state: dict | None = None):
        self.mode, self.rank, self.world, self.method = mode, rank, world, method
        self.step, self.losses = 0, []
        sd = None
        if state is not None:
            method.load_state_dict(state["method"])
            self.step, self.losses, sd = state["step"], list(state["losses"]), state["model"]
        self._build(sd)

    def _build(self, sd):
        model = self.method.prepare(_model())
        if sd is not None:
            model.load_state_dict(sd, strict=True)
        self.module, self.wrapped = model, model
        if self.mode == "ddp":
            self.wrapped = nn.parallel.DistributedDataParallel(model)
        elif self.mode == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            fully_shard(model, mesh=init_device_mesh("cpu", (self.world,)))
        from dist_sparse.train import build_optimizer
        from dist_sparse.config import config_from_dict

        cfg = config_from_dict({"optim": {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3}})
        self.opt = build_optimizer(cfg, model, self.method.param_group_overrides(model))
        for g in self.opt.param_groups:
            g["lr"] = 0.1 * self.method.lr_scale
        self.method.bind(model, self.opt)

    def train(self, until: int):
        from dist_sparse import distributed as D
        from dist_sparse.driver import run_surgery

        per = GLOBAL_BATCH // self.world
        while self.step < until:
            x, y = _batch(self.step)
            x, y = x[self.rank * per:(self.rank + 1) * per], y[self.rank * per:(self.rank + 1) * per]
            loss = nn.functional.cross_entropy(self.wrapped(x), y)
            loss.backward()
            self.method.after_backward(self.module, self.step)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.method.after_step(self.module, self.step)
            val = loss.detach().reshape(1).clone()
            if self.world > 1:
                dist.all_reduce(val)
                val /= self.world
            self.losses.append(float(val))
            self.step += 1
            if self.step % STEPS_PER_EPOCH == 0 and self.step < STEPS_PER_EPOCH * EPOCHS:
                req = self.method.on_epoch_end(self.module, self.step // STEPS_PER_EPOCH - 1, {})
                if req is not None:
                    sd = run_surgery(self.module, req, lambda: self.method.prepare(_model()))
                    self._build(sd)
        return self

    def checkpoint(self):
        from dist_sparse import distributed as D

        return {"method": self.method.state_dict(), "model": D.full_state_dict(self.module),
                "step": self.step, "losses": list(self.losses)}

    def summary(self):
        m = self.method
        return {"history": m.controller.history, "flags": m.controller.flags, "ranks": m.ranks,
                "switch_epoch": m.switch_epoch, "losses": self.losses, "lr_scale": m.lr_scale,
                "n_params": sum(int(p.numel()) for p in self.module.parameters())}  # DTensor: the global numel


def _scenario(mode: str, rank: int, world: int, timing: str = "immediate") -> dict:
    full = _Loop(mode, rank, world, _method(timing)).train(STEPS_PER_EPOCH * EPOCHS)
    out = full.summary()
    if timing == "immediate":
        first = _Loop(mode, rank, world, _method(timing)).train(2 * STEPS_PER_EPOCH)  # right after the switch
        assert first.method.ranks is not None
        state = first.checkpoint()
        resumed = _Loop(mode, rank, world, _method(timing), state=state).train(STEPS_PER_EPOCH * EPOCHS)
        out["resumed_losses"] = resumed.losses
    return out


def _perturbed(rank: int) -> dict:
    method = _method()
    model = _model()
    if rank == 1:
        with torch.no_grad():
            model[2].weight.mul_(torch.linspace(0.1, 3.0, 32, dtype=torch.float64)[:, None])
    return method._measure(model, ["2", "4"])


def _uneven_fsdp2(world: int) -> dict:
    """batched_gather_full on FSDP2 shards of uneven size (33 rows over 2 ranks) and a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from dist_sparse import distributed as D

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(7, 33), nn.Linear(33, 5)).double()
    want = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model[0], mesh=init_device_mesh("cpu", (world,)))
    got = D.batched_gather_full(dict(model.named_parameters()), dtype=torch.float64)
    return {n: bool(torch.equal(got[n], want[n])) for n in want}


MODES = ("ddp", "fsdp2")


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = {mode: _scenario(mode, rank, world) for mode in MODES}
        result["perturbed"] = _perturbed(rank)
        result["uneven"] = _uneven_fsdp2(world)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, free_port(), d), nprocs=2, join=True)
        return [torch.load(os.path.join(d, f"rank{r}.pt"), weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def single():
    return _scenario("plain", 0, 1)


def test_single_process_switches_and_resumes(single):
    assert single["switch_epoch"] == 2 and single["ranks"] and set(single["ranks"]) == {"2", "4"}
    assert all(1 <= r < 32 for r in single["ranks"].values())  # vanilla stable rank: a real reduction
    assert single["n_params"] < sum(p.numel() for p in _model().parameters())
    assert single["resumed_losses"] == single["losses"]
    assert len(single["losses"]) == STEPS_PER_EPOCH * EPOCHS


def test_lagged_timing_switches_one_epoch_later():
    lagged = _scenario("plain", 0, 1, timing="lagged")
    assert lagged["switch_epoch"] == 3


@pytest.mark.parametrize("mode", MODES)
def test_two_ranks_match_one_process(mode, two_process, single):
    r0, r1 = two_process[0][mode], two_process[1][mode]
    for key in ("history", "flags", "ranks", "switch_epoch", "losses", "n_params"):
        assert r0[key] == r1[key], (mode, key)
    assert r0["ranks"] == single["ranks"] and r0["switch_epoch"] == single["switch_epoch"]
    assert r0["flags"] == single["flags"] and r0["n_params"] == single["n_params"]
    for n in single["history"]:
        torch.testing.assert_close(torch.tensor(r0["history"][n]), torch.tensor(single["history"][n]),
                                   rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(r0["losses"]), torch.tensor(single["losses"]), rtol=1e-9, atol=0)
    torch.testing.assert_close(torch.tensor(r0["resumed_losses"]), torch.tensor(r0["losses"]), rtol=1e-12, atol=0)


def test_one_collective_gather_of_uneven_shards(two_process):
    for r in range(2):
        assert all(two_process[r]["uneven"].values()), two_process[r]["uneven"]


def test_perturbed_rank_follows_rank_zero(two_process):
    from dist_sparse.metrics.layer_stats import stable_rank

    a, b = two_process[0]["perturbed"], two_process[1]["perturbed"]
    assert a == b
    assert a["2"] == pytest.approx(stable_rank(_model()[2].weight), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# ZeRO-1/2/3 through the trainer (slow)
# ------------------------------------------------------------------------------------------------


TRAINER_ARGS = ["--config", TINY, "method.name=cuttlefish", "method.window=1", "method.last_m=1",
                "method.threshold=1000000", "method.eval_batches=1", "method.rank_metric=vanilla",
                "data.train_subset=256", "data.val_subset=128", "data.batch_size=64", "run.epochs=3",
                "logging.progress_bar=false", "run.channels_last=false", "checkpoint.every_epoch=true",
                # the same global batch on 1 and 2 processes gives the same trajectory only without batch
                # statistics (GroupNorm) and in fp32 ("auto" is bf16 on a CPU with AVX512-BF16)
                "model.norm=gn", "model.extra.zero_init_residual=true", "run.deterministic=true",
                "run.mixed_precision=no"]


def _switch_facts(run_dir: str) -> dict:
    """Switch epoch, chosen ranks and parameter count of a finished trainer run."""
    from tests.conftest import read_metrics

    rows = read_metrics(run_dir)
    last = [r for r in rows if r["event"] == "epoch"][-1]["method"]
    end = [r for r in rows if r["event"] == "end"][-1]
    return {"switch_epoch": last["switch_epoch"], "params": end["params"],
            "ranks": {k: v for k, v in last.items() if k.startswith("rank/")}}


@pytest.fixture(scope="module")
def one_process_switch(tmp_path_factory):
    """The reference: the same run on one plain process (the same global batch of 64)."""
    from tests.conftest import run_train

    out = tmp_path_factory.mktemp("cf_one")
    run_train(TRAINER_ARGS + ["run.num_processes=1", f"run.output_dir={out}", "run.name=one"])
    return _switch_facts(str(out / "one"))


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zero1", "zero2", "zero3", "fsdp", "ddp"])
def test_trainer_switch_under_backend(backend, tmp_path, one_process_switch):
    from tests.conftest import ROOT, child_env, read_metrics
    from tests.distributed.test_backends import _needs

    _needs(backend)
    args = TRAINER_ARGS + ["run.num_processes=2", f"run.output_dir={tmp_path}", "run.name=r"]
    run_sh = os.path.join(ROOT, "launch", "run.sh")

    def launch(extra):
        p = subprocess.run(["bash", run_sh, backend, "--nproc", "2", "--"] + args + extra, cwd=ROOT,
                           env=child_env(), capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-4000:]

    launch([])
    rows = read_metrics(str(tmp_path / "r"))
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert [e["method"]["switched"] for e in epochs] == [0, 1, 1]
    start, end = [r for r in rows if r["event"] == "start"][0], [r for r in rows if r["event"] == "end"][0]
    assert end["params"] != start["params"]
    assert epochs[-1]["method"]["switch_epoch"] == 1
    assert all(math.isfinite(e["train_loss"]) for e in epochs)
    # the same switch epoch, ranks (from the stable ranks of the trained weights) and size as one process
    facts = _switch_facts(str(tmp_path / "r"))
    assert len(facts["ranks"]) > 0 and facts == one_process_switch, (facts, one_process_switch)
    # resume from the last (post-switch) checkpoint into the factorized architecture, one more epoch
    launch(["run.epochs=4", "checkpoint.resume=auto"])
    rows = read_metrics(str(tmp_path / "r"))
    assert [r["epoch"] for r in rows if r["event"] == "epoch"] == [0, 1, 2, 3]
    assert rows[-1]["event"] == "end" and rows[-1]["params"] == end["params"]
