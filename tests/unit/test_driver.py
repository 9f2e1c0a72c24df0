"""The driver's step order, with a method that records every hook call."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dist_sparse.driver import Driver, PlainLoop, run_surgery
from dist_sparse.errors import RunError
from dist_sparse.methods.base import Method, MethodConfig, Rebuild


class Recorder(Method):
    name = "recorder"

    def __init__(self):
        super().__init__(MethodConfig(name="recorder"))
        self.calls: list[tuple] = []

    def bind(self, model, optimizer):
        super().bind(model, optimizer)
        self.calls.append(("bind",))

    def regularizer(self, model):
        self.calls.append(("regularizer",))
        return 0.0 * model.weight.sum()

    def after_backward(self, model, step):
        self.calls.append(("after_backward", step, model.weight.grad is not None))

    def after_step(self, model, step):
        self.calls.append(("after_step", step))


class SkippingSGD(torch.optim.SGD):
    """Reports every second step as skipped, like a GradScaler after an overflow."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.n = 0

    def step(self, closure=None):
        self.n += 1
        if self.n % 2 == 0:
            return None
        return super().step(closure)

    @property
    def step_was_skipped(self):
        return self.n % 2 == 0


def _loss(model, batch):
    return model(batch).square().mean()


def _driver(accum=1, opt_cls=torch.optim.SGD):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    method = Recorder()
    opt = opt_cls(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    d = Driver(method, PlainLoop(grad_accum_steps=accum), _loss)
    d.attach(model, opt, sched)
    return d, method, sched


def test_order_with_accumulation():
    d, method, sched = _driver(accum=2)
    x = torch.randn(4, 3)
    r1 = d.micro_step(x)
    r2 = d.micro_step(x)
    assert (r1.synced, r2.synced, r2.applied) == (False, True, True)
    assert method.calls == [("bind",), ("regularizer",), ("regularizer",), ("after_backward", 0, True),
                            ("after_step", 0)]
    assert d.step == 1 and sched.last_epoch == 1


def test_skipped_step_skips_schedule_and_after_step():
    d, method, sched = _driver(opt_cls=SkippingSGD)
    x = torch.randn(4, 3)
    results = [d.micro_step(x) for _ in range(4)]
    assert [r.applied for r in results] == [True, False, True, False]
    steps = [c for c in method.calls if c[0] == "after_step"]
    assert steps == [("after_step", 0), ("after_step", 2)]
    assert [c[1] for c in method.calls if c[0] == "after_backward"] == [0, 1, 2, 3]
    assert sched.last_epoch == 2 and d.step == 4 and d.skipped_steps == 2


def test_surgery_error_is_one_line_run_error():
    model = nn.Linear(3, 2)

    def broken(m):
        raise ValueError("planned failure\nsecond line")

    with pytest.raises(RunError) as err:
        run_surgery(model, Rebuild(surgery=broken, reason="test"), lambda: nn.Linear(3, 2))
    assert str(err.value) == "rebuild (test) failed on rank 0: ValueError: planned failure"


def test_surgery_result_and_commit():
    model = nn.Linear(3, 2)
    done = []
    sd = run_surgery(model, Rebuild(surgery=lambda m: nn.Sequential(m), commit=lambda: done.append(1)),
                     lambda: nn.Linear(3, 2))
    assert done == [1] and set(sd) == {"0.weight", "0.bias"}
    assert torch.equal(sd["0.weight"], model.weight.detach())
