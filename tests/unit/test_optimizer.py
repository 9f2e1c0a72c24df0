"""Optimizer groups: a method's per-parameter override inherits what it does not name; lr_scale."""
from __future__ import annotations

import pytest
import torch

from dist_sparse.config import config_from_dict
from dist_sparse.methods import create_method
from dist_sparse.models import create_model
from dist_sparse.train import build_optimizer, build_scheduler


def _cfg(opt: str):
    return config_from_dict({"optim": {"name": opt, "lr": 0.1, "weight_decay": 5e-4},
                             "schedule": {"name": "constant"}})


def _group_of(optimizer, param):
    return next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_override_naming_only_lr_keeps_the_runs_weight_decay(opt):
    cfg = _cfg(opt)
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    optimizer = build_optimizer(cfg, model, {"fc.weight": {"lr": 0.01}, "bn1.weight": {"lr": 0.02}})
    fc = _group_of(optimizer, model.fc.weight)
    assert fc["lr"] == 0.01 and fc["weight_decay"] == 5e-4  # not torch's default (0 SGD, 0.01 AdamW)
    bn = _group_of(optimizer, model.bn1.weight)
    assert bn["lr"] == 0.02 and bn["weight_decay"] == 0.0  # a norm weight's group has no decay
    plain = _group_of(optimizer, model.layer1[0].conv1.weight)
    assert plain["lr"] == 0.1 and plain["weight_decay"] == 5e-4
    if opt == "adamw":
        assert fc["betas"] == plain["betas"] and fc["eps"] == plain["eps"]
    else:
        assert fc["momentum"] == plain["momentum"] == 0.9 and fc["nesterov"] == plain["nesterov"]


def test_override_can_set_weight_decay_on_a_1d_parameter():
    cfg = _cfg("sgd")
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    optimizer = build_optimizer(cfg, model, {"bn1.bias": {"weight_decay": 3.05e-5}})
    g = _group_of(optimizer, model.bn1.bias)
    assert g["weight_decay"] == 3.05e-5 and g["lr"] == 0.1


def test_override_of_an_unknown_parameter_is_an_error():
    model = create_model("resnet20", num_classes=10, in_chans=1, img_size=28)
    with pytest.raises(ValueError, match="nope.weight"):
        build_optimizer(_cfg("sgd"), model, {"nope.weight": {"lr": 0.1}})


def test_lr_scale_multiplies_the_schedule_and_is_restored():
    cfg = _cfg("sgd")
    method = create_method(config_from_dict({"method": {"name": "dense"}}).method)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(cfg, model, {})
    sched = build_scheduler(cfg, optimizer, 10, 5, scale=lambda: method.lr_scale)
    optimizer.step()
    sched.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    method.lr_scale = 0.25
    optimizer.step()
    sched.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    fresh = create_method(config_from_dict({"method": {"name": "dense"}}).method)
    fresh.load_state_dict(method.state_dict())
    assert fresh.lr_scale == 0.25
