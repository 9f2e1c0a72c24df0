"""benchmarks/masked_train_flops.py against hand formulas (RigL: constant densities plus dense-gradient
update steps; Static: Train F = Test F; GMP: dense before pruning, so Train F lies between Test F and 1)."""
import os

import pytest

from dist_sparse.config import load_config
from tests.conftest import ROOT, load_benchmark


def _cfg(name, *over):
    return load_config(os.path.join(ROOT, "configs", f"tiny_resnet20_{name}.yaml"), ["run.epochs=1", *over])


def test_rigl_formula():
    f = load_benchmark("masked_train_flops").fractions(_cfg("rigl", "method.sparsity=0.85"), train_size=6400)  # 50 steps
    n, u, rho = f["steps"], f["dense_grad_steps"], f["test"]
    assert n == 50 and u == 1  # delta_t 100, t_end 0.75: only the update at step 0
    assert f["train"] == pytest.approx((3 * rho * (n - u) + u * (2 * rho + 1)) / (3 * n), rel=1e-12)
    assert 0.1 < rho < 0.5


def test_static_train_equals_test():
    f = load_benchmark("masked_train_flops").fractions(_cfg("static"), train_size=6400)
    assert f["dense_grad_steps"] == 0 and f["train"] == pytest.approx(f["test"], rel=1e-12)


def test_gmp_between_final_and_dense():
    f = load_benchmark("masked_train_flops").fractions(_cfg("gmp", "method.sparsity=0.85"), train_size=12800)  # 100 steps, prune every 50
    assert f["test"] < f["train"] < 1.0


def test_refuses_a_method_without_masks():
    with pytest.raises(ValueError, match="expected a mask-based method"):
        load_benchmark("masked_train_flops").fractions(_cfg("autosparse"), train_size=6400)
