"""RigL / SET / Static / GMP controllers: the acceptance checks of specs/rigl.md section 4 (single process)."""
from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

from dist_sparse.config import ConfigError, config_from_dict
from dist_sparse.methods import create_method
from dist_sparse.methods.base import RunContext
from dist_sparse.methods.rigl import GMP, DropSchedule, GMPSchedule, RigL, RigLConfig
from dist_sparse.surgery import masking as M


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def _method(name: str = "rigl", total_steps: int = 40, seed: int = 0, **fields):
    cfg = config_from_dict({"method": {"name": name, **fields}}).method
    method = create_method(cfg, seed=seed)
    method.setup(RunContext(total_steps=total_steps, steps_per_epoch=10))
    return method


def _optimizer(model, kind="sgd", wd=1e-2):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=wd)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=wd, amsgrad=True)
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=wd)


def _batch(step: int):
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=g), torch.randint(0, 5, (16,), generator=g)


def _train(model, method, opt, steps, start=0, on_update=None):
    for t in range(start, start + steps):
        x, y = _batch(t)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        method.after_backward(model, t)
        opt.step()
        method.after_step(model, t)
        if on_update is not None:
            on_update(t)


def _setup(name="rigl", kind="sgd", total_steps=40, seed=0, **fields):
    model = _mlp(seed)
    method = _method(name, total_steps=total_steps, seed=seed, **fields)
    model = method.prepare(model)
    opt = _optimizer(model, kind)
    method.bind(model, opt)
    return model, method, opt


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key,value", [("sparsity", 1.0), ("sparsity", -0.1), ("delta_t", 0), ("alpha", 1.0),
                                       ("t_end", 0.0), ("distribution", "er"), ("growth_grad_window", 200),
                                       ("include", []), ("overrides", {"fc.*": 1.5}), ("drop_noise_std", -1.0)])
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"method": {"name": "rigl", key: value}})
    assert f"method.{key}" in str(err.value)


def test_config_unknown_key_lists_known_keys():
    with pytest.raises(ConfigError, match="delta_t"):
        config_from_dict({"method": {"name": "rigl", "deltaT": 5}})
    with pytest.raises(ConfigError, match="method.s_init"):
        config_from_dict({"method": {"name": "gmp", "sparsity": 0.5, "s_init": 0.6}})


def test_no_matching_weights_is_a_config_error():
    method = _method("static", include=["nothing.*"])
    with pytest.raises(ConfigError, match="method.include"):
        method.prepare(_mlp())


# ------------------------------------------------------------------------------------------------
# schedule (check 2)
# ------------------------------------------------------------------------------------------------


def test_cosine_drop_fraction_and_update_steps():
    s = DropSchedule(alpha=0.3, delta_t=10, t_end=75)
    for t in range(0, 100):
        expected = 0.15 * (1 + math.cos(math.pi * t / 75)) if t <= 75 else 0.0
        assert abs(s.fraction(t) - expected) < 1e-7
    assert s.fraction(0) == pytest.approx(0.3) and s.fraction(37.5) == pytest.approx(0.15)
    assert [t for t in range(200) if s.is_update(t)] == [0, 10, 20, 30, 40, 50, 60, 70]
    s2 = DropSchedule(alpha=0.3, delta_t=10, t_end=70, update_at_step0=False)
    assert [t for t in range(200) if s2.is_update(t)] == [10, 20, 30, 40, 50, 60]
    s3 = DropSchedule(alpha=0.5, delta_t=5, t_end=30, begin=10)
    assert [t for t in range(60) if s3.is_update(t)] == [10, 15, 20, 25]
    assert s3.fraction(10) == pytest.approx(0.5) and s3.fraction(20) == pytest.approx(0.25)


def test_method_t_end_is_a_fraction_of_total_steps():
    m = _method("rigl", total_steps=1000)
    assert m.schedule.t_end == 750 and m.schedule.delta_t == 100
    m = _method("rigl", total_steps=1000, t_end=300)
    assert m.schedule.t_end == 300


# ------------------------------------------------------------------------------------------------
# exact counts (check 1) and drop/grow counts (check 2)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_exact_parameter_count_and_masked_weights_zero(kind):
    model, method, opt = _setup("rigl", kind, sparsity=0.8, delta_t=3, distribution="erk")
    total = sum(method.active.values())
    expected = {n: M.active_count(math.prod(s), method.target_density[n]) for n, s in method.shapes.items()}
    assert method.active == expected
    params = dict(model.named_parameters())
    updates = []

    def check(t):
        assert sum(method.active.values()) == total
        for n in method.names:
            mask, w = method.masks[n], params[n]
            assert int(mask.sum()) == method.active[n] == expected[n]
            assert torch.count_nonzero(w[~mask]) == 0  # masked entries exactly 0 after the step
            assert int(torch.count_nonzero(w)) <= method.active[n]
        if method.last.get("step") == t:
            updates.append(t)
            f = method.schedule.fraction(t)
            for n in method.names:
                assert method.last[f"dropped/{n}"] == math.floor(f * expected[n])

    _train(model, method, opt, 40, on_update=check)
    assert updates == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]  # t_end = 30
    assert method.updates_done == len(updates)


def test_masks_actually_change_and_report():
    model, method, opt = _setup("rigl", sparsity=0.8, delta_t=2)
    before = {n: m.clone() for n, m in method.masks.items()}
    _train(model, method, opt, 10)
    assert any(not torch.equal(before[n], method.masks[n]) for n in method.names)
    rep = method.report()
    assert rep["sparsity/updates"] == 5 and 0.75 < rep["sparsity/global"] < 0.85
    assert rep["rigl/grown"] == rep["rigl/dropped"] and "density/2.weight" in rep


# ------------------------------------------------------------------------------------------------
# grown weights are zero, output unchanged, nothing else moves (check 5); state reset (check 6)
# ------------------------------------------------------------------------------------------------


def _update_with_regrow(kind):
    """Run to just before an update, then do the update by hand with a gradient that forces a re-grow."""
    model, method, opt = _setup("rigl", kind, total_steps=40, sparsity=0.75, delta_t=5, update_at_step0=False,
                                distribution="uniform", first_layer_dense=False)
    _train(model, method, opt, 5)  # steps 0..4: normal steps build optimizer state
    t = 5
    x, y = _batch(t)
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    name = "2.weight"
    p = dict(model.named_parameters())[name]
    old = method.masks[name].clone()
    k = math.floor(method.schedule.fraction(t) * method.active[name])
    score = torch.where(old, p.detach().abs(), torch.tensor(float("inf")))
    victim = int(torch.sort(score.reshape(-1), stable=True).indices[0])  # smallest |w|: surely dropped
    with torch.no_grad():
        p.grad.view(-1)[victim] = 1e6  # its gradient is the largest: it is re-grown
    w_before = {n: q.detach().clone() for n, q in model.named_parameters()}
    st_before = {n: {k2: v.clone() for k2, v in opt.state[q].items()} for n, q in model.named_parameters()}
    out_ref_model = copy.deepcopy(model)
    out_ref_model.old_masks = {n: m.clone() for n, m in method.masks.items()}
    return model, method, opt, t, name, old, k, victim, w_before, st_before, out_ref_model, x, y


@pytest.mark.parametrize("kind", ["sgd", "adam", "adamw"])
def test_update_resets_state_and_zero_inits_grown(kind):
    model, method, opt, t, name, old, k, victim, w_before, st_before, ref_model, x, y = _update_with_regrow(kind)
    method.after_backward(model, t)  # the update (skip_sgd_on_update: grads dropped)
    assert method.last["step"] == t and method.last[f"dropped/{name}"] == k > 0
    opt.step()
    method.after_step(model, t)
    params = dict(model.named_parameters())
    new = method.masks[name]
    assert int(new.sum()) == int(old.sum())
    assert bool(new.view(-1)[victim]) and bool(old.view(-1)[victim])  # the re-grown position
    grown_new = new & ~old
    dropped = old & ~new
    assert int(grown_new.sum()) > 0 and int(dropped.sum()) > 0
    w = params[name]
    assert torch.count_nonzero(w[grown_new]) == 0  # new connections start at 0
    # skip_sgd_on_update: no weight moved except the dropped ones (now zero)
    for n, q in params.items():
        expected = w_before[n] * new if n == name else w_before[n]
        if n in method.masks and n != name:
            expected = w_before[n] * method.masks[n]
        assert torch.equal(q.detach(), expected), n
    assert w.view(-1)[victim] == w_before[name].view(-1)[victim]  # re-grown keeps its value
    # every per-element state tensor: 0 at new and dropped positions, bit-identical elsewhere
    keys = {"sgd": ["momentum_buffer"], "adam": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
            "adamw": ["exp_avg", "exp_avg_sq"]}[kind]
    changed = old ^ new
    for key in keys:
        before, after = st_before[name][key], opt.state[w][key]
        assert torch.count_nonzero(before[changed]) > 0, key  # the test would notice a missing reset
        assert torch.count_nonzero(after[changed]) == 0, key
        assert torch.equal(after[~changed], before[~changed]), key
        assert after.view(-1)[victim] == before.view(-1)[victim], key  # re-grown keeps its state
    if kind != "sgd":
        assert torch.equal(opt.state[w]["step"], st_before[name]["step"])  # the Adam step was skipped
    # output equals the pre-update model with only the dropped weights zeroed (fp32, eval)
    with torch.no_grad():
        for n, q in ref_model.named_parameters():
            if n in method.masks:
                q.mul_((~(ref_model.old_masks[n] & ~method.masks[n])).float())
        assert torch.equal(model.eval()(x), ref_model.eval()(x))


def test_update_after_sgd_step_when_not_skipping():
    model, method, opt = _setup("rigl", total_steps=40, sparsity=0.8, delta_t=4, skip_sgd_on_update=False)
    x, y = _batch(0)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    old = {n: m.clone() for n, m in method.masks.items()}
    method.after_backward(model, 0)
    assert method.updates_done == 0  # the update waits for the step
    opt.step()
    method.after_step(model, 0)
    assert method.updates_done == 1
    params = dict(model.named_parameters())
    assert not torch.equal(params["0.bias"], w0["0.bias"])  # the SGD step happened
    for n in method.names:
        new = method.masks[n]
        assert int(new.sum()) == int(old[n].sum())
        assert torch.count_nonzero(params[n][new & ~old[n]]) == 0


# ------------------------------------------------------------------------------------------------
# dense gradient (check 7)
# ------------------------------------------------------------------------------------------------


def test_growth_uses_the_dense_gradient_of_the_effective_weight(monkeypatch):
    model, method, opt = _setup("rigl", sparsity=0.9, delta_t=5, distribution="uniform")
    seen = {}
    orig = RigL._grow_score

    def spy(self, name, param, step, dense_grad):
        seen[name] = dense_grad.detach().clone()
        return orig(self, name, param, step, dense_grad)

    monkeypatch.setattr(RigL, "_grow_score", spy)
    x, y = _batch(0)
    # reference: gradient w.r.t. W_eff = W * M as a free leaf, computed functionally
    eff = {n: (p.detach() * method.masks[n] if n in method.masks else p.detach()).requires_grad_(True)
           for n, p in model.named_parameters()}
    out = torch.func.functional_call(model, eff, (x,))
    nn.functional.cross_entropy(out, y).backward()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    old = {n: m.clone() for n, m in method.masks.items()}
    method.after_backward(model, 0)
    assert sorted(seen) == ["2.weight", "4.weight"]  # the dense first layer has nothing to swap
    for n in seen:
        assert torch.count_nonzero(seen[n][~old[n]]) > 0  # dense: non-zero where the mask is 0
        torch.testing.assert_close(seen[n], eff[n].grad, rtol=0, atol=1e-7)


def test_growth_grad_window_averages_last_gradients(monkeypatch):
    model, method, opt = _setup("rigl", sparsity=0.8, delta_t=5, growth_grad_window=3, update_at_step0=False)
    seen, grads = {}, {}
    orig = RigL._grow_score

    def spy(self, name, param, step, dense_grad):
        seen[(name, step)] = dense_grad.detach().clone()
        return orig(self, name, param, step, dense_grad)

    monkeypatch.setattr(RigL, "_grow_score", spy)
    params = dict(model.named_parameters())
    for t in range(6):
        x, y = _batch(t)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        grads[t] = params["2.weight"].grad.detach().clone()
        method.after_backward(model, t)
        opt.step()
        method.after_step(model, t)
    expected = (grads[3] + grads[4] + grads[5]) / 3  # the dense gradients of steps 3, 4, 5
    torch.testing.assert_close(seen[("2.weight", 5)], expected)


# ------------------------------------------------------------------------------------------------
# checkpoint / resume (check 9)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["rigl", "set", "gmp"])
def test_resume_reproduces_uninterrupted_masks(name, tmp_path):
    fields = dict(sparsity=0.8, delta_t=4) if name != "gmp" else dict(sparsity=0.8, delta_t=3, t_start=5, t_end=20)
    if name == "rigl":
        fields["growth_grad_window"] = 2
    hist_a = {}
    model, method, opt = _setup(name, "adamw", total_steps=30, **fields)
    _train(model, method, opt, 30, on_update=lambda t: hist_a.__setitem__(t, {n: m.clone() for n, m in method.masks.items()}))
    params_a = dict(model.named_parameters())

    model, method, opt = _setup(name, "adamw", total_steps=30, **fields)
    _train(model, method, opt, 11)  # step 11 is inside the gradient window of the update at 12
    path = tmp_path / "ckpt.pt"
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "method": method.state_dict()}, path)
    ck = torch.load(path, weights_only=False)

    model2 = _mlp(seed=123)  # a different init: everything must come from the checkpoint
    method2 = _method(name, total_steps=30, seed=0, **fields)
    method2.load_state_dict(ck["method"])
    model2 = method2.prepare(model2)
    model2.load_state_dict(ck["model"])
    opt2 = _optimizer(model2, "adamw")
    opt2.load_state_dict(ck["opt"])
    method2.bind(model2, opt2)
    hist_b = {}
    _train(model2, method2, opt2, 19, start=11,
           on_update=lambda t: hist_b.__setitem__(t, {n: m.clone() for n, m in method2.masks.items()}))
    later = [t for t in range(11, 30) if method.schedule.is_update(t)]
    assert len(later) >= 2
    for t in later:
        for n in method.names:
            assert torch.equal(hist_a[t][n], hist_b[t][n]), (t, n)
    for n, p in model2.named_parameters():  # and the weights themselves
        assert torch.equal(p, params_a[n]), n


def test_load_rejects_other_method_and_model():
    _, rigl, _ = _setup("rigl")
    with pytest.raises(ValueError, match="method state"):
        _method("set").load_state_dict(rigl.state_dict())
    other = _method("rigl")
    small = other.prepare(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    other.bind(small, torch.optim.SGD(small.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="sparse weights differ"):
        other.load_state_dict(rigl.state_dict())


# ------------------------------------------------------------------------------------------------
# baselines (check 10)
# ------------------------------------------------------------------------------------------------


def test_static_never_changes_mask():
    model, method, opt = _setup("static", sparsity=0.7)
    before = {n: m.clone() for n, m in method.masks.items()}
    _train(model, method, opt, 12)
    for n in method.names:
        assert torch.equal(before[n], method.masks[n])
        assert torch.count_nonzero(dict(model.named_parameters())[n][~before[n]]) == 0
    assert method.updates_done == 0


def test_set_grows_seeded_random_positions():
    runs = []
    for _ in range(2):
        model, method, opt = _setup("set", sparsity=0.8, delta_t=3)
        _train(model, method, opt, 10)
        runs.append({n: m.clone() for n, m in method.masks.items()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])  # same seed, same masks
    model, rigl, opt = _setup("rigl", sparsity=0.8, delta_t=3)
    _train(model, rigl, opt, 10)
    assert any(not torch.equal(runs[0][n], rigl.masks[n]) for n in runs[0])
    # the grow scores depend only on (seed, layer, step)
    _, s1, _ = _setup("set", sparsity=0.8)
    assert torch.equal(s1._grow_score("2.weight", None, 7, None), s1._grow_score("2.weight", None, 7, None))
    assert not torch.equal(s1._grow_score("2.weight", None, 7, None), s1._grow_score("2.weight", None, 8, None))


def test_gmp_follows_cubic_schedule_and_ends_at_target():
    total = 40
    model, method, opt = _setup("gmp", total_steps=total, sparsity=0.9, distribution="uniform", t_start=8,
                                t_end=26, delta_t=4)
    assert isinstance(method, GMP) and method.schedule == GMPSchedule(t0=8, t1=26, delta_t=4)
    assert all(m.all() for m in method.masks.values())  # dense at the start
    seen = {}
    _train(model, method, opt, total, on_update=lambda t: seen.__setitem__(t, dict(method.active)))
    steps = [t for t in range(total) if method.schedule.is_update(t)]
    assert steps == [8, 12, 16, 20, 24, 26]
    for t in range(total):
        for n, s in method.shapes.items():
            s_f = 1.0 - method.target_density[n]
            p = min(max((t - 8) / 18, 0.0), 1.0)
            expected_s = s_f + (0.0 - s_f) * (1 - p) ** 3
            last = max([u for u in steps if u <= t], default=None)
            want = math.prod(s) if last is None else M.active_count(
                math.prod(s), 1 - (s_f + (0.0 - s_f) * (1 - min(max((last - 8) / 18, 0), 1)) ** 3))
            assert seen[t][n] == want, (t, n)
            if t in steps:
                assert method.layer_sparsity(n, t) == pytest.approx(expected_s)
    final = method.densities()
    assert final["0.weight"] == 1.0  # uniform: first layer dense
    assert final["2.weight"] == pytest.approx(0.1, abs=1 / 1024) and final["4.weight"] == pytest.approx(0.1, abs=0.01)
    params = dict(model.named_parameters())
    for n in method.names:
        assert torch.count_nonzero(params[n][~method.masks[n]]) == 0


# ------------------------------------------------------------------------------------------------
# misc: init scaling, plot
# ------------------------------------------------------------------------------------------------


def test_sparse_fanin_init_rescales_by_density():
    a, b = _mlp(0), _mlp(0)
    ma = _method("static", sparsity=0.75, distribution="uniform", first_layer_dense=False)
    mb = _method("static", sparsity=0.75, distribution="uniform", first_layer_dense=False, init="sparse_fanin")
    ma.prepare(a)
    mb.prepare(b)
    wa, wb = a[2].weight, b[2].weight
    torch.testing.assert_close(wb, wa * 2.0)  # 1/sqrt(0.25)


def test_plot_writes_png(tmp_path):
    model, method, opt = _setup("rigl", sparsity=0.8, delta_t=2)
    _train(model, method, opt, 3)
    paths = method.plot(str(tmp_path))
    assert len(paths) == 1 and os.path.getsize(paths[0]) > 1000
    with open(paths[0], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_config_dataclass_defaults_match_paper():
    c = RigLConfig()
    assert (c.delta_t, c.t_end, c.alpha, c.anneal, c.update_at_step0, c.skip_sgd_on_update) == \
        (100, 0.75, 0.3, "cosine", True, True)


# ------------------------------------------------------------------------------------------------
# end to end through the trainer
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_tiny_rigl_config_trains_end_to_end(tmp_path):
    import json
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cmd = [sys.executable, "-m", "dist_sparse.train", "--config", "configs/tiny_resnet20_rigl.yaml",
           "run.num_processes=1", "run.max_steps=30", f"run.output_dir={tmp_path}", "run.name=e2e",
           "run.channels_last=false", "data.batch_size=32", "data.train_subset=960", "data.val_subset=256",
           "method.delta_t=5", "logging.progress_bar=false", "logging.log_every_steps=5",
           "checkpoint.every_epoch=false"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(tmp_path / "e2e" / "metrics.jsonl")]
    train = [r for r in rows if r["event"] == "train"]
    epoch = [r for r in rows if r["event"] == "epoch"][-1]
    rep = epoch["method"]
    assert rep["sparsity/updates"] == 5  # steps 0, 5, 10, 15, 20 (T_end = 0.75 * 30 = 22)
    assert rep["sparsity/global"] == pytest.approx(0.8, abs=0.01)
    assert train[-1]["loss"] < train[0]["loss"]  # it learns
    assert (tmp_path / "e2e" / "rigl_density.png").exists()
