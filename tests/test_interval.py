import pytest
import torch
from torch import nn

from provae.interval import Interval, interval_exp, overflow_to_vacuous, propagate


def test_linear_by_hand():
    # deepmind/interval-bound-propagation's check: w = 1, b = 2 on [1, 2, 3] +- 1 gives [5, 11].
    layer = nn.Linear(3, 1)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.bias.fill_(2.0)
    x = torch.tensor([[1.0, 2.0, 3.0]])
    out = propagate(layer, Interval(x - 1, x + 1))
    assert out.lower.item() == 5.0 and out.upper.item() == 11.0


def test_linear_negative_weight_swaps_ends():
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[2.0, -3.0]]))
        layer.bias.fill_(0.5)
    out = propagate(layer, Interval(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 2.0]])))
    # lower = 2*0 - 3*2 + 0.5, upper = 2*1 - 3*1 + 0.5
    assert out.lower.item() == pytest.approx(-5.5) and out.upper.item() == pytest.approx(-0.5)


def test_conv_transpose_on_2x2_by_hand():
    # Stride 2, kernel 2: each input pixel v paints its own 2x2 block v * W + b.
    layer = nn.ConvTranspose2d(1, 1, kernel_size=2, stride=2)
    weight = torch.tensor([[1.0, -1.0], [2.0, 0.0]])
    with torch.no_grad():
        layer.weight.copy_(weight.view(1, 1, 2, 2))
        layer.bias.fill_(0.5)
    lower = torch.tensor([[0.0, -1.0], [1.0, 2.0]]).view(1, 1, 2, 2)
    upper = torch.tensor([[1.0, 1.0], [3.0, 2.0]]).view(1, 1, 2, 2)
    out = propagate(layer, Interval(lower, upper))
    expected_lower = torch.empty(4, 4)
    expected_upper = torch.empty(4, 4)
    for i in range(2):
        for j in range(2):
            a, b = lower[0, 0, i, j], upper[0, 0, i, j]
            block = slice(2 * i, 2 * i + 2), slice(2 * j, 2 * j + 2)
            expected_lower[block] = torch.minimum(weight * a, weight * b) + 0.5
            expected_upper[block] = torch.maximum(weight * a, weight * b) + 0.5
    torch.testing.assert_close(out.lower[0, 0], expected_lower)
    torch.testing.assert_close(out.upper[0, 0], expected_upper)


@pytest.mark.parametrize(
    "layer, expected",
    [
        (nn.ReLU(), ([0.0, 0.0, 0.5], [0.0, 2.0, 3.0])),
        (nn.Sigmoid(), (torch.sigmoid(torch.tensor([-2.0, -1.0, 0.5])).tolist(),
                        torch.sigmoid(torch.tensor([-1.0, 2.0, 3.0])).tolist())),
    ],
)
def test_monotone_maps_apply_to_both_ends(layer, expected):
    x = Interval(torch.tensor([-2.0, -1.0, 0.5]), torch.tensor([-1.0, 2.0, 3.0]))
    out = propagate(layer, x)
    torch.testing.assert_close(out.lower, torch.tensor(expected[0]))
    torch.testing.assert_close(out.upper, torch.tensor(expected[1]))


def test_exp_interval():
    out = interval_exp(Interval(torch.tensor([-1.0]), torch.tensor([2.0])))
    torch.testing.assert_close(out.lower, torch.exp(torch.tensor([-1.0])))
    torch.testing.assert_close(out.upper, torch.exp(torch.tensor([2.0])))


def test_unknown_layer_raises():
    supported = "Conv2d, ConvTranspose2d, Flatten, Linear, ReLU, Sequential, Sigmoid, Unflatten"
    with pytest.raises(TypeError, match=f"no interval rule for layer Tanh; supported: {supported}$"):
        propagate(nn.Tanh(), Interval.point(torch.zeros(1)))


def test_contains_by_hand():
    """The tests' own yardstick: both ends count as inside, anything past them does not (unless by tol)."""
    box = Interval(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0]))
    assert box.contains(torch.tensor([0.0, 2.0])) and box.contains(torch.tensor([1.0, 1.0]))
    assert not box.contains(torch.tensor([1.5, 1.5])) and not box.contains(torch.tensor([-0.5, 1.5]))
    assert not box.contains(torch.tensor([0.5, 2.5]))
    assert box.contains(torch.tensor([1.5, 1.5]), tol=0.5) and not box.contains(torch.tensor([1.5, 1.5]), tol=0.4)


def test_overflowed_ends_become_vacuous():
    """An end that is not finite (inf, or NaN from inf - inf) says nothing: -inf below, +inf above."""
    nan, inf = float("nan"), float("inf")
    out = overflow_to_vacuous(torch.tensor([nan, inf, -inf, 1.0]), torch.tensor([nan, -inf, inf, 2.0]))
    assert out.lower.tolist() == [-inf, -inf, -inf, 1.0] and out.upper.tolist() == [inf, inf, inf, 2.0]


def test_interval_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        Interval(torch.zeros(2), torch.zeros(3))


LAYERS = {
    "linear": (nn.Linear(12, 7), (12,)),
    "conv2d": (nn.Conv2d(2, 3, 4, stride=2, padding=1), (2, 6, 6)),
    "conv_transpose2d": (nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1), (3, 3, 3)),
    "conv_transpose2d_dilated": (nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1, dilation=2),
                                 (2, 3, 3)),
    "relu": (nn.ReLU(), (5,)),
    "sigmoid": (nn.Sigmoid(), (5,)),
    "flatten": (nn.Flatten(), (2, 3, 3)),
    "unflatten": (nn.Unflatten(1, (2, 3)), (6,)),
    "network": (
        nn.Sequential(
            nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
            nn.Unflatten(1, (2, 4, 4)), nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1), nn.Sigmoid(),
        ),
        (1, 8, 8),
    ),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_points_inside_the_box_land_inside_the_bounds(name):
    torch.manual_seed(0)
    layer, shape = LAYERS[name]
    center = torch.randn(4, *shape)
    radius = torch.rand(4, *shape) * 0.5
    box = Interval(center - radius, center + radius)
    bounds = propagate(layer, box)
    with torch.no_grad():
        for _ in range(200):
            u = torch.rand(4, *shape)
            assert bounds.contains(layer(box.lower + u * (box.upper - box.lower)), tol=1e-5)
        # The corners of the input box too, where violations of a wrong rule show first.
        corner = torch.where(torch.rand(4, *shape) < 0.5, box.lower, box.upper)
        assert bounds.contains(layer(corner), tol=1e-5)
