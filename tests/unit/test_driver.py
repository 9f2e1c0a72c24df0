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


class ScaledLoop(PlainLoop):
    """accelerate's fp16 contract on a CPU: a real torch GradScaler multiplies the loss, the
    optimizer wrapper steps through the scaler, ``clip_grad_norm_`` unscales itself first (as
    ``Accelerator.clip_grad_norm_`` does), and a second unscale in one step is torch's error."""

    native_amp, mixed_precision = True, "fp16"

    def __init__(self, init_scale):
        super().__init__()
        self.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
        self.opt = None

    def wrap(self, opt):
        loop = self

        class Wrapped:
            param_groups = opt.param_groups

            def step(self):
                before = loop.scaler.get_scale()
                loop.scaler.step(opt)
                loop.scaler.update()
                self.step_was_skipped = loop.scaler.get_scale() < before

            def zero_grad(self, set_to_none=True):
                opt.zero_grad(set_to_none=set_to_none)

        self.opt = opt
        return Wrapped()

    def backward(self, loss):
        self.scaler.scale(loss).backward()

    def unscale_gradients(self, optimizer=None):
        self.scaler.unscale_(self.opt)

    def clip_grad_norm_(self, parameters, max_norm):
        self.unscale_gradients()
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)


class GradReader(Recorder):
    def after_backward(self, model, step):
        self.calls.append(("grad", model.weight.grad.clone()))


@pytest.mark.parametrize("clip", [0.0, 1e6])
def test_fp16_hooks_see_unscaled_gradients_and_overflow_skips(clip):
    torch.manual_seed(0)
    model, x = nn.Linear(3, 2), torch.randn(4, 3)
    ref = nn.Linear(3, 2)
    ref.load_state_dict(model.state_dict())
    _loss(ref, x).backward()
    loop = ScaledLoop(init_scale=2.0 ** 12)
    method = GradReader()
    opt = loop.wrap(torch.optim.SGD(model.parameters(), lr=0.1))
    sched = torch.optim.lr_scheduler.LambdaLR(loop.opt, lambda s: 1.0 / (s + 1))
    d = Driver(method, loop, _loss, grad_clip=clip)
    d.attach(model, opt, sched)
    r = d.micro_step(x)
    grads = [c[1] for c in method.calls if c[0] == "grad"]
    assert r.applied and len(grads) == 1
    torch.testing.assert_close(grads[0], ref.weight.grad)  # not 4096 x the gradient
    assert ("after_step", 0) in method.calls and sched.last_epoch == 1
    # an overflow: the scaler skips the step, so do the schedule and the method
    w = model.weight.detach().clone()
    r = d.micro_step(torch.full((4, 3), float("inf")))
    assert not r.applied and d.skipped_steps == 1 and d.step == 2
    assert torch.equal(model.weight, w) and sched.last_epoch == 1
    assert ("after_step", 1) not in method.calls
