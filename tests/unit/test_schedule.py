"""Learning-rate schedules against hand-computed values."""
from __future__ import annotations

import math

from dist_sparse.config import load_config
from dist_sparse.train import lr_factor
from tests.conftest import TINY


def cfg_with(*over):
    return load_config(TINY, list(over))


def test_cosine_with_warmup():
    cfg = cfg_with("schedule.name=cosine", "schedule.warmup_steps=10", "schedule.warmup_epochs=0")
    assert lr_factor(cfg, 0, 110, 10) == 0.1
    assert lr_factor(cfg, 9, 110, 10) == 1.0
    assert math.isclose(lr_factor(cfg, 60, 110, 10), 0.5)  # halfway through the cosine part
    assert math.isclose(lr_factor(cfg, 110, 110, 10), 0.0, abs_tol=1e-12)


def test_cosine_floor():
    cfg = cfg_with("schedule.warmup_epochs=0", "schedule.min_lr_ratio=0.1")
    assert math.isclose(lr_factor(cfg, 100, 100, 10), 0.1)


def test_step_schedule():
    cfg = cfg_with("schedule.name=step", "schedule.warmup_epochs=0", "schedule.milestones=[0.5, 0.75]",
                   "schedule.gamma=0.1")
    assert lr_factor(cfg, 49, 100, 10) == 1.0
    assert math.isclose(lr_factor(cfg, 50, 100, 10), 0.1)
    assert math.isclose(lr_factor(cfg, 75, 100, 10), 0.01)


def test_inverse_sqrt():
    cfg = cfg_with("schedule.name=inverse_sqrt", "schedule.warmup_steps=4000")
    assert math.isclose(lr_factor(cfg, 3999, 10**6, 100), 1.0)
    assert math.isclose(lr_factor(cfg, 15999, 10**6, 100), 0.5)
    assert math.isclose(lr_factor(cfg, 1999, 10**6, 100), 0.5)


def test_warmup_epochs():
    cfg = cfg_with("schedule.name=constant", "schedule.warmup_epochs=0.5")
    assert lr_factor(cfg, 0, 100, 10) == 0.2 and lr_factor(cfg, 5, 100, 10) == 1.0
