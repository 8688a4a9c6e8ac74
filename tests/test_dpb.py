"""DynamicPositionBias: the seed API, closed forms and errors."""

import math

import pytest
import torch
from torch import nn

from dynpos import DynamicPositionBias
from dynpos.positional.base import toeplitz


def make(**options) -> DynamicPositionBias:
    torch.manual_seed(0)
    return DynamicPositionBias(dim=16, heads=4, **options)


def test_default_mlp_layout():
    dpb = DynamicPositionBias(dim=64, heads=8)
    kinds = [type(m) for m in dpb.mlp]
    assert kinds == [nn.Linear, nn.SiLU, nn.Linear, nn.SiLU, nn.Linear]
    assert (dpb.mlp[0].in_features, dpb.mlp[0].out_features) == (1, 64)
    assert (dpb.mlp[2].in_features, dpb.mlp[2].out_features) == (64, 64)
    assert (dpb.mlp[4].in_features, dpb.mlp[4].out_features) == (64, 8)


def test_depth_and_norm_options():
    dpb = DynamicPositionBias(dim=8, heads=2, depth=3, norm=True)
    kinds = [type(m) for m in dpb.mlp]
    assert kinds == [nn.Linear, nn.LayerNorm, nn.SiLU] * 3 + [nn.Linear]


def test_shapes():
    dpb = DynamicPositionBias(dim=64, heads=8)
    assert dpb(0, 5).shape == (8, 0, 5)
    assert dpb(3, 7).shape == (8, 3, 7)
    assert dpb(0, 0).shape == (8, 0, 0)
    assert dpb.distance_table(6).shape == (8, 6)


def test_zero_last_layer_gives_zero_bias():
    dpb = make()
    nn.init.zeros_(dpb.mlp[-1].weight)
    nn.init.zeros_(dpb.mlp[-1].bias)
    assert torch.equal(dpb(5, 9), torch.zeros(4, 5, 9))


def test_unsigned_bias_is_symmetric_toeplitz_of_mlp():
    dpb = make()
    n = 9
    bias = dpb(n, n)
    for h in range(4):
        assert torch.allclose(bias[h], bias[h].T)
    with torch.no_grad():
        for x in range(n):
            for y in range(n):
                direct = dpb.mlp(torch.tensor([[float(abs(x - y))]]))[0]
                assert torch.allclose(bias[:, x, y], direct, atol=1e-6)


def test_last_i_rows_of_full_grid():
    dpb = make()
    full = dpb(10, 10)
    for i in (0, 1, 4, 10):
        assert torch.allclose(dpb(i, 10), full[:, 10 - i :], atol=1e-6)


def test_signed_distances_are_asymmetric_and_exact():
    dpb = make(signed=True)
    bias = dpb(6, 6)
    with torch.no_grad():
        for x in range(6):
            for y in range(6):
                direct = dpb.mlp(torch.tensor([[float(x - y)]]))[0]
                assert torch.allclose(bias[:, x, y], direct, atol=1e-6)
    assert not torch.allclose(bias[0], bias[0].T)
    assert torch.allclose(dpb(2, 6), bias[:, 4:], atol=1e-6)


def test_log_distance_feeds_signed_log():
    dpb = make(log_distance=True, signed=True)
    bias = dpb(5, 5)
    with torch.no_grad():
        for x in range(5):
            for y in range(5):
                r = x - y
                feed = math.copysign(math.log1p(abs(r)), r)
                direct = dpb.mlp(torch.tensor([[feed]]))[0]
                assert torch.allclose(bias[:, x, y], direct, atol=1e-6)


def test_distance_table_matches_grid_and_toeplitz():
    dpb = make()
    table = dpb.distance_table(8)
    grid = dpb(8, 8)
    assert torch.allclose(table, grid[:, 7, :].flip(-1), atol=1e-6)
    lower = torch.ones(8, 8).tril().bool()
    assert torch.allclose(toeplitz(table, 8)[:, lower], grid[:, lower], atol=1e-6)
    assert torch.allclose(toeplitz(table, 3)[:, torch.ones(3, 8).tril(5).bool()],
                          grid[:, 5:][:, torch.ones(3, 8).tril(5).bool()], atol=1e-6)


def test_mlp_runs_over_distinct_distances_only():
    dpb = make()
    seen = []
    dpb.mlp[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    dpb(64, 64)
    assert seen == [64]
    seen.clear()
    signed = make(signed=True)
    signed.mlp[0].register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    signed(5, 64)
    assert seen == [5 + 64 - 1]


@pytest.mark.parametrize(
    "i, j, fragment",
    [(5, 3, "i=5, j=3"), (-1, 3, "i=-1"), (1, -2, "j=-2"), (1.5, 3, "1.5"), (2, "4", "'4'")],
)
def test_bad_sizes_raise_value_error(i, j, fragment):
    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        make()(i, j)


@pytest.mark.parametrize("kwargs, fragment", [({"dim": 0, "heads": 2}, "dim"), ({"dim": 4, "heads": -1}, "heads")])
def test_bad_constructor_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        DynamicPositionBias(**kwargs)


def test_gradients_reach_every_parameter():
    dpb = make(norm=True, log_distance=True)
    dpb(6, 10).square().sum().backward()
    for name, p in dpb.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
