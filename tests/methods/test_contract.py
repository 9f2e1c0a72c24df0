"""The contract every registered method keeps (a new method joins by registering):

* ``prepare`` is pure: twice on equal models gives equal models, and the method's state is unchanged;
* ``state_dict`` round-trips through ``torch.load(weights_only=True)``;
* a run killed and resumed from its checkpoint equals the uninterrupted run, bit for bit;
* decisions (masks, thresholds, ranks, ...) are bit-identical on 2 ranks (tests/methods/test_contract_dist.py);
* ``finalize`` + export load into the registered architecture without dist_sparse modules and give the
  training-time model's eval outputs (max abs diff <= 1e-5).
"""
from __future__ import annotations

import json

import pytest
import torch

from dist_sparse.checkpoint import load_exported, save_exported
from tests.methods.harness import (EPOCHS, MODEL, MODEL_KW, STEPS_PER_EPOCH, Run, contract_methods, digest,
                                   global_batch, make_method, registered_model, roundtrip)

METHODS = contract_methods()


def test_every_builtin_method_is_in_the_suite():
    assert {"dense", "static", "set", "rigl", "gmp", "oneshot"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_prepare_is_pure_before_setup(name):
    method = make_method(name)  # no setup: sparsify(model, recipe) runs before any trainer
    before = digest(method.state_dict())
    a, b = method.prepare(registered_model()), method.prepare(registered_model())
    assert digest(a.state_dict()) == digest(b.state_dict())
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    assert digest(method.state_dict()) == before


@pytest.mark.parametrize("name", METHODS)
def test_prepare_is_pure_mid_run(name):
    run = Run(name).train(until=STEPS_PER_EPOCH + 2)
    before = digest(run.method.state_dict())
    a, b = run.plain(), run.plain()
    assert digest(a.state_dict()) == digest(b.state_dict())
    assert digest(run.method.state_dict()) == before


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trips_weights_only(name):
    run = Run(name).train(until=STEPS_PER_EPOCH + 3)
    state = roundtrip(run.method.state_dict())  # raises if anything is not weights_only-safe
    fresh = make_method(name)
    fresh.load_state_dict(state)
    assert digest(fresh.state_dict()) == digest(run.method.state_dict())


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("kill_at", [STEPS_PER_EPOCH + 2, 2 * STEPS_PER_EPOCH])
def test_kill_and_resume_equals_uninterrupted(name, kill_at):
    full = Run(name).train()
    first = Run(name).train(until=kill_at)
    resumed = Run(name, state=first.checkpoint()).train()
    assert resumed.losses == full.losses  # every loss, bit for bit
    assert digest(resumed.method.state_dict()) == digest(full.method.state_dict())
    assert digest(resumed.module.state_dict()) == digest(full.module.state_dict())
    assert len(full.losses) == STEPS_PER_EPOCH * EPOCHS


@pytest.mark.parametrize("name", METHODS)
def test_finalize_export_loads_into_plain_model(name, tmp_path):
    run = Run(name).train()
    plain = run.plain()
    plain.load_state_dict(run.module.state_dict(), strict=True)
    final = run.method.finalize(plain).eval()
    path = str(tmp_path / "model.safetensors")
    save_exported(final, path, {"model": MODEL, "model_kwargs": json.dumps(MODEL_KW), "method": name,
                                "architecture": json.dumps(run.method.architecture())})
    loaded = load_exported(path)
    assert all(type(m).__module__.split(".")[0] in ("torch", "dist_sparse") for m in loaded.modules())
    assert not any(type(m).__module__.startswith(("dist_sparse.methods", "dist_sparse.surgery"))
                   for m in loaded.modules())
    x = global_batch(999)[0]
    want = run.eval_outputs(x)
    with torch.no_grad():
        got = loaded(x)
    assert (got - want).abs().max().item() <= 1e-5


def test_docs_show_the_example_method_verbatim():
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "methods.md"), encoding="utf-8") as fh:
        doc = fh.read()
    with open(os.path.join(root, "tests", "methods", "example_method.py"), encoding="utf-8") as fh:
        code = fh.read()
    assert "```python\n" + code + "```" in doc
