"""BatchNorm under a backend that hands it bf16 parameters beside fp32 running statistics (FSDP2 and
DeepSpeed with mixed precision): torch's CPU kernel refuses the mix, norm_affine_in_stats_dtype makes the
norm compute with its weight and bias in the statistics' dtype."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from dist_sparse.models.norms import norm_affine_in_stats_dtype


def _bn_pair(momentum):
    torch.manual_seed(0)
    ref = nn.BatchNorm2d(3, momentum=momentum)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([0.5, 1.5, -2.0]))
        ref.bias.copy_(torch.tensor([0.25, -1.0, 3.0]))
    low = copy.deepcopy(ref)
    low.weight.data = low.weight.data.bfloat16()  # what FSDP2 / DeepSpeed hand the forward
    low.bias.data = low.bias.data.bfloat16()
    return ref, low


def test_plain_batchnorm_refuses_the_mix():
    _, low = _bn_pair(0.1)
    with pytest.raises(RuntimeError, match="expected scalar type"):
        low(torch.randn(4, 3, 5, 5).bfloat16())


@pytest.mark.parametrize("momentum", [0.1, None])
def test_affine_in_stats_dtype_matches_fp32_batchnorm(momentum):
    ref, low = _bn_pair(momentum)
    params_before = [id(p) for p in low.parameters()]
    assert norm_affine_in_stats_dtype(nn.Sequential(low)) == 1
    assert type(low).__name__ == "BatchNorm2d" and isinstance(low, nn.BatchNorm2d)
    assert [id(p) for p in low.parameters()] == params_before  # an optimizer over them stays valid
    assert list(low.state_dict()) == list(ref.state_dict())
    torch.manual_seed(1)
    for step in range(3):
        x = torch.randn(8, 3, 5, 5) * (step + 1)
        xb = x.bfloat16()
        y_ref = ref(xb.float())
        y = low(xb)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), y_ref, atol=0.05, rtol=0.02)
        # the running statistics are updated in fp32 as by the fp32 norm
        assert low.running_mean.dtype == torch.float32
        torch.testing.assert_close(low.running_mean, ref.running_mean, atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(low.running_var, ref.running_var, atol=5e-2, rtol=1e-2)
        assert int(low.num_batches_tracked) == step + 1
    # the gradient reaches the bf16 parameters, equal to the fp32 norm's
    xb = torch.randn(8, 3, 5, 5).bfloat16()
    g = torch.randn(8, 3, 5, 5)
    ref(xb.float()).backward(g)
    low(xb).float().backward(g)
    assert low.weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(low.weight.grad.float(), ref.weight.grad, atol=0.5, rtol=0.02)
    torch.testing.assert_close(low.bias.grad.float(), ref.bias.grad, atol=0.5, rtol=0.02)
    # eval uses the running statistics
    low.eval(), ref.eval()
    torch.testing.assert_close(low(xb).float(), ref(xb.float()), atol=0.05, rtol=0.02)


def test_same_dtypes_take_torch_path_and_others_are_left_alone():
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.BatchNorm1d(3), nn.GroupNorm(1, 3),
                          nn.LayerNorm(3))
    assert norm_affine_in_stats_dtype(model) == 2
    assert type(model[3]) is nn.GroupNorm and type(model[4]) is nn.LayerNorm
    ref = nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 2, 2)
    torch.testing.assert_close(model[1](x), ref(x), rtol=0, atol=0)  # fp32 throughout: exactly torch's
    assert norm_affine_in_stats_dtype(model) == 0  # idempotent
