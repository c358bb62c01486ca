"""Behaviour of provae/linear_bounds.py that the older tests left open (reports/mutation.md, issue 21).

The relaxed networks (``encoder_relaxation``, ``decoder_relaxation``, ``back_substitute_lower``)
on a network small enough to bound by hand; which neurons full CROWN refines; exact ranges of
affine networks with dilated, grouped and unusually padded convolutions; the patches' geometry;
float64 networks; chunking; the error messages. CPU, seconds in all.
"""

import copy

import pytest
import torch
from torch import nn

import provae.linear_bounds as lb
from provae.interval import Interval
from provae.linear_bounds import (back_substitute_lower, decoder_interval, decoder_relaxation, encoder_intervals,
                                  encoder_relaxation, linear_bounds, relu_relaxation)

from conftest import small_model, synthetic_images
from test_linear_bounds import LAYERS, _assert_contains_samples, _ibp, _random_box


# ---------------------------------------------------------------- a network bounded by hand


def cancellation_layers():
    """v = relu(x) - relu(x) + 1/4 on a scalar x, then relu(v): always relu(1/4) = 1/4.

    On x in [l, u] (l < 0 < u) CROWN relaxes relu(x) by x <= relu(x) <= s x + t (s = u / (u - l),
    t = -l s; lower slope 1 as u >= -l below), so v lies between x - (s x + t) + 1/4 and
    (s x + t) - x + 1/4; IBP only knows relu(x) in [0, u], so v in [1/4 - u, 1/4 + u]."""
    first, second = nn.Linear(1, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0, -1.0]])), second.bias.fill_(0.25)
    return [first, nn.ReLU(), second, nn.ReLU()]


# Three inputs: x in [-1, 2] (both ReLUs unstable for IBP), [0.5, 1] and [0.75, 1] (the first ReLU active).
CANCELLATION_BOX = Interval(torch.tensor([[-1.0], [0.5], [0.75]]), torch.tensor([[2.0], [1.0], [1.0]]))

# The box of v, the second ReLU's input, by hand. x in [-1, 2]: s = 2/3, t = 2/3; v between x/3 - 5/12
# and -x/3 + 11/12: [-3/4, 5/4]; IBP: [-7/4, 9/4]. x in [0.5, 1]: relu(x) = x exactly, v = 1/4; IBP
# [1/4 - 1/2, 1/4 + 1/2] = [-1/4, 3/4], unstable (so refined). x in [0.75, 1]: v = 1/4; IBP [0, 1/2],
# stable (l = 0 is active): backward CROWN leaves it, forward mode tightens every neuron.
V_IBP = Interval(torch.tensor([[-1.75], [-0.25], [0.0]]), torch.tensor([[2.25], [0.75], [0.5]]))
V_BACKWARD = Interval(torch.tensor([[-0.75], [0.25], [0.0]]), torch.tensor([[1.25], [0.25], [0.5]]))
V_FORWARD = Interval(torch.tensor([[-0.75], [0.25], [0.25]]), torch.tensor([[1.25], [0.25], [0.25]]))

# relu(v) by hand. CROWN boxes: [-3/4, 5/4] gives the line 5/8 v + 15/32, at most 5/4 where v is largest
# (x = -1); the lower line v says -3/4, the IBP box [0, 5/4] says 0. [1/4, 1/4] and [0, 1/2] (active):
# relu(v) = v = 1/4 exactly. IBP boxes: [-7/4, 9/4] gives 9/16 v + 63/64, at most 27/16; [-1/4, 3/4]
# gives 3/4 v + 3/16 = 3/8 at v = 1/4, and v = 1/4 below.
OUT_CROWN = Interval(torch.tensor([[0.0], [0.25], [0.25]]), torch.tensor([[1.25], [0.25], [0.25]]))
OUT_IBP = Interval(torch.tensor([[0.0], [0.25], [0.25]]), torch.tensor([[27 / 16], [0.375], [0.25]]))


class HandVAE(nn.Module):
    """The cancellation network as an encoder (heads mu = f, log sigma = -f) and as a decoder body."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(*cancellation_layers())
        self.decoder = nn.Sequential(*cancellation_layers(), nn.Sigmoid())
        self.mu_head, self.log_sigma_head = nn.Linear(1, 1), nn.Linear(1, 1)
        with torch.no_grad():
            self.mu_head.weight.fill_(1.0), self.mu_head.bias.zero_()
            self.log_sigma_head.weight.fill_(-1.0), self.log_sigma_head.bias.zero_()


def assert_interval(actual, expected):
    torch.testing.assert_close(actual.lower, expected.lower)
    torch.testing.assert_close(actual.upper, expected.upper)


def assert_relaxations_of(network):
    assert sorted(network.relaxations) == sorted(network.pre_activation) == [1, 3]
    for position, pre in network.pre_activation.items():
        expected = relu_relaxation(pre)
        for name in ("lower_slope", "upper_slope", "upper_intercept"):
            torch.testing.assert_close(getattr(network.relaxations[position], name), getattr(expected, name))


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_encoder_relaxation_by_hand(intermediate):
    model = HandVAE()
    network, mu, log_sigma = encoder_relaxation(model, CANCELLATION_BOX, intermediate=intermediate)
    crown = intermediate == "crown"
    assert network.layers == list(model.encoder)
    assert [tuple(s) for s in network.shapes] == [(1,), (2,), (2,), (1,), (1,)]
    assert_interval(network.pre_activation[1], Interval(CANCELLATION_BOX.lower.expand(3, 2),
                                                        CANCELLATION_BOX.upper.expand(3, 2)))
    assert_interval(network.pre_activation[3], V_BACKWARD if crown else V_IBP)
    assert_relaxations_of(network)
    # ``output``: the features' IBP box, from the refined boxes.
    v = V_BACKWARD if crown else V_IBP
    assert_interval(network.output, Interval(v.lower.clamp(min=0), v.upper.clamp(min=0)))
    expected = OUT_CROWN if crown else OUT_IBP  # mu = f
    assert_interval(mu, expected)
    assert_interval(log_sigma, Interval(-expected.upper, -expected.lower))
    # The same numbers as encoder_intervals in direction "backward".
    same_mu, same_log_sigma = encoder_intervals(model, CANCELLATION_BOX, intermediate=intermediate,
                                                direction="backward")
    for a, b in ((mu, same_mu), (log_sigma, same_log_sigma)):
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_decoder_relaxation_by_hand(intermediate):
    model = HandVAE()
    network = decoder_relaxation(model, CANCELLATION_BOX, intermediate=intermediate)
    crown = intermediate == "crown"
    assert network.layers == list(model.decoder)[:-1]  # the Sigmoid apart
    assert [tuple(s) for s in network.shapes] == [(1,), (2,), (2,), (1,), (1,)]
    assert_interval(network.pre_activation[1], Interval(CANCELLATION_BOX.lower.expand(3, 2),
                                                        CANCELLATION_BOX.upper.expand(3, 2)))
    assert_interval(network.pre_activation[3], V_FORWARD if crown else V_IBP)
    assert_relaxations_of(network)
    assert_interval(network.output, OUT_CROWN if crown else OUT_IBP)
    # The body's output through the Sigmoid is decoder_interval in direction "forward", bit for bit.
    box = decoder_interval(model, CANCELLATION_BOX, intermediate=intermediate, direction="forward")
    assert torch.equal(torch.sigmoid(network.output.lower), box.lower)
    assert torch.equal(torch.sigmoid(network.output.upper), box.upper)


# ---------------------------------------------------------------- back_substitute_lower


def test_back_substitute_lower_by_hand():
    """Through the encoder relaxed on x in [-1, 2] (CROWN boxes): f = relu(v), v's box [-3/4, 5/4].
    +f: the lower line f >= v = relu(x) - relu(x) + 1/4 >= x - (2x/3 + 2/3) + 1/4 = x/3 - 5/12.
    -f: the upper line, -f >= -(5/8 v + 15/32) >= -5/8 (2x/3 + 2/3) + 5/8 x - 5/32 - 15/32 = 5x/24 - 25/24.
    A lower slope 0 at position 3 instead: +f >= 0."""
    network, _, _ = encoder_relaxation(HandVAE(), CANCELLATION_BOX, intermediate="crown")
    coef, const = back_substitute_lower(network, torch.tensor([[[1.0], [-1.0]]]).expand(3, 2, 1), torch.zeros(3, 2))
    assert coef.shape == (3, 2, 1) and const.shape == (3, 2)  # one group per example by default
    torch.testing.assert_close(coef[0, :, 0], torch.tensor([1 / 3, 5 / 24]))
    torch.testing.assert_close(const[0], torch.tensor([-5 / 12, -25 / 24]))
    # Examples 1 and 2: relu(x) = x and v = 1/4 exactly; relu(v) = v (stable: the same line both ways).
    torch.testing.assert_close(coef[1:, :, 0], torch.zeros(2, 2))
    torch.testing.assert_close(const[1:], torch.tensor([[0.25, -0.25], [0.25, -0.25]]))
    # A constant is carried through, per group; a group belongs to the example ``rows`` names.
    coef, const = back_substitute_lower(network, torch.tensor([[[1.0]], [[1.0]]]), torch.tensor([[1.0], [2.0]]),
                                        rows=torch.tensor([1, 0]))
    torch.testing.assert_close(coef[:, 0, 0], torch.tensor([0.0, 1 / 3]))  # example 1: relu(x) = x, v = 1/4
    torch.testing.assert_close(const[:, 0], torch.tensor([1.25, 2 - 5 / 12]))
    # Another lower slope (alpha-CROWN), for the unstable neuron of example 0.
    slopes = {3: torch.zeros(3, 1)}
    coef, const = back_substitute_lower(network, torch.tensor([[[1.0]]]), torch.zeros(1, 1), lower_slopes=slopes,
                                        rows=torch.tensor([0]))
    torch.testing.assert_close(coef, torch.zeros(1, 1, 1))
    torch.testing.assert_close(const, torch.zeros(1, 1))


@pytest.mark.parametrize("side", ["encoder", "decoder"])
def test_back_substitute_lower_is_below_the_network(side):
    """Random coefficients through a small VAE's relaxed encoder or decoder body: for points of the
    box, coef' . v + const' <= coef . f(v) + const, and it is the exact value at a point box."""
    model = small_model()
    g = torch.Generator().manual_seed(0)
    if side == "encoder":
        x = synthetic_images(3)
        box = Interval((x - 0.05).clamp(0, 1), (x + 0.05).clamp(0, 1))
        network, _, _ = encoder_relaxation(model, box)
        point_network, _, _ = encoder_relaxation(model, Interval.point(x))
        body, center = model.encoder, x
    else:
        z = torch.randn((3, model.latent_dim), generator=g)
        box = Interval(z - 0.1, z + 0.1)
        network = decoder_relaxation(model, box)
        point_network = decoder_relaxation(model, Interval.point(z))
        body, center = model.decoder[:-1], z
    out_shape = network.output.lower.shape[1:]
    coef = torch.randn((3, 5, *out_shape), generator=g)
    const = torch.randn((3, 5), generator=g)
    on_input, at_zero = back_substitute_lower(network, coef, const)
    assert on_input.shape == (3, 5, *box.lower.shape[1:])
    u = torch.rand((8, *box.lower.shape), generator=g)
    with torch.no_grad():
        for point in box.lower + u * (box.upper - box.lower):
            value = (coef.flatten(2) @ body(point).flatten(1).unsqueeze(2)).squeeze(2) + const
            bound = (on_input.flatten(2) @ point.flatten(1).unsqueeze(2)).squeeze(2) + at_zero
            assert (bound <= value + 1e-4 * (1 + value.abs())).all()
        on_point, at_point = back_substitute_lower(point_network, coef, const)
        exact = (coef.flatten(2) @ body(center).flatten(1).unsqueeze(2)).squeeze(2) + const
        bound = (on_point.flatten(2) @ center.flatten(1).unsqueeze(2)).squeeze(2) + at_point
        torch.testing.assert_close(bound, exact, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- exact ranges of affine networks


def exact_affine_range(net, box):
    """The exact range of an affine network over a box, from its matrix (probed on unit vectors):
    f(center) +- |M| radius."""
    shape = box.lower.shape[1:]
    size = int(torch.tensor(shape).prod())
    with torch.no_grad():
        at_zero = net(torch.zeros(1, *shape))
        matrix = (net(torch.eye(size).view(size, *shape)) - at_zero).flatten(1)  # [D, out]
        center = net(box.center).flatten(1)
    spread = box.radius.flatten(1) @ matrix.abs()
    return Interval((center - spread).view_as(net(box.lower)), (center + spread).view_as(net(box.lower)))


AFFINE = {
    "dilated_conv": ([nn.Conv2d(2, 3, 3, padding=2, dilation=2), nn.Conv2d(3, 2, 1)], (2, 7, 7)),
    "dilated_strided_conv": ([nn.Conv2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Conv2d(3, 2, 1)], (2, 8, 8)),
    "grouped_conv": ([nn.Conv2d(4, 4, 3, padding=1, groups=2), nn.Conv2d(4, 2, 1)], (4, 5, 5)),
    "conv_transpose_unpadded": ([nn.ConvTranspose2d(2, 3, 3, stride=2), nn.Conv2d(3, 2, 1)], (2, 3, 3)),
    "conv_transpose_padding_2": ([nn.ConvTranspose2d(2, 3, 5, stride=2, padding=2), nn.Conv2d(3, 2, 1)], (2, 4, 4)),
    "conv_transpose_dilated": ([nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1, dilation=2), nn.Conv2d(3, 2, 1)],
                               (2, 3, 3)),
    "conv_transpose_grouped": ([nn.ConvTranspose2d(4, 4, 4, stride=2, padding=1, groups=2), nn.Conv2d(4, 2, 1)],
                               (4, 3, 3)),
}


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("name", list(AFFINE))
def test_affine_networks_get_their_exact_range(name, direction):
    """No ReLU: the linear bounds are the exact range (IBP's box of two layers is looser)."""
    torch.manual_seed(0)
    layers, shape = AFFINE[name]
    net = nn.Sequential(*layers)
    box = _random_box(shape, n=2)
    exact = exact_affine_range(net, box)
    assert ((exact.upper - exact.lower) < (_ibp(net, box).upper - _ibp(net, box).lower) - 1e-3).any()
    bounds = linear_bounds(layers, box, direction=direction)
    torch.testing.assert_close(bounds.lower, exact.lower, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bounds.upper, exact.upper, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- patches


def test_window_through_a_convolution():
    """k' = (k - 1) s_c + k_c, s' = s s_c, p' = p s_c + p_c, per axis."""
    window = lb._Window((4, 3), (2, 1), (1, 0))
    earlier = window.through(nn.Conv2d(1, 1, (5, 2), stride=(3, 2), padding=(2, 1)))
    assert earlier == lb._Window((14, 6), (6, 2), (5, 1))


def receptive_field(prefix, shape, cell):
    """Which positions of the input map influence output cell ``cell`` (any channel): by autograd."""
    x = torch.randn(1, *shape, requires_grad=True)
    out = nn.Sequential(*prefix)(x)
    (grad,) = torch.autograd.grad(out[0, :, cell[0], cell[1]].sum(), x)
    return grad[0].abs().sum(0) > 0


def test_patch_geometry_of_the_mnist_encoder_prefix():
    """conv 4x4 s2 p1, ReLU, conv 4x4 s2 p1 on 28x28: 4x4 windows (stride 2, padding 1) on the ReLU's
    map, 10x10 (stride 4, padding 3) on the image; each window covers its cell's receptive field."""
    torch.manual_seed(0)
    prefix = [nn.Conv2d(1, 3, 4, stride=2, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 4, stride=2, padding=1)]
    shapes = lb._shapes(prefix, Interval.point(torch.zeros(1, 1, 28, 28)))
    windows = lb._patch_geometry(prefix, shapes)
    assert windows == [lb._Window((10, 10), (4, 4), (3, 3)), lb._Window((4, 4), (2, 2), (1, 1)),
                       lb._Window((4, 4), (2, 2), (1, 1))]
    for cell in [(0, 0), (3, 5), (6, 6)]:
        field = receptive_field([prefix[0], prefix[2]], (1, 28, 28), cell)  # the ReLU changes no geometry
        window = torch.zeros(28 + 6, 28 + 6, dtype=torch.bool)
        window[4 * cell[0] : 4 * cell[0] + 10, 4 * cell[1] : 4 * cell[1] + 10] = True
        assert torch.equal(field, window[3:-3, 3:-3])


@pytest.mark.parametrize("prefix, shape", [
    ([nn.Conv2d(1, 2, 3, padding=1), nn.ReLU()], (1, 6, 6)),  # ends in a ReLU
    ([nn.Flatten(), nn.Linear(36, 4)], (1, 6, 6)),  # not a convolution
    ([nn.ConvTranspose2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3)], (1, 6, 6)),
    ([nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, groups=2)], (1, 6, 6)),
    ([nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, dilation=2)], (1, 6, 6)),
], ids=["ends_in_a_relu", "linear", "conv_transpose", "groups", "dilation"])
def test_patch_geometry_declines_what_patches_cannot_do(prefix, shape):
    shapes = lb._shapes(prefix, Interval.point(torch.zeros(1, *shape)))
    assert lb._patch_geometry(prefix, shapes) is None


def test_patch_geometry_of_a_deeper_stack():
    """Windows whose grid arithmetic does not divide evenly: (8 + 6 - 9) / 4 + 1 is not 2, its floor is."""
    prefix = [nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(),
              nn.Conv2d(2, 3, 2, stride=2)]
    shapes = lb._shapes(prefix, Interval.point(torch.zeros(1, 1, 8, 8)))
    assert lb._patch_geometry(prefix, shapes) == [
        lb._Window((9, 9), (4, 4), (3, 3)), lb._Window((4, 4), (2, 2), (1, 1)), lb._Window((4, 4), (2, 2), (1, 1)),
        lb._Window((2, 2), (2, 2), (0, 0)), lb._Window((2, 2), (2, 2), (0, 0))]
    # Two convolutions back to back (no ReLU between): the window goes through both.
    prefix = [nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2, padding=1)]
    shapes = lb._shapes(prefix, Interval.point(torch.zeros(1, 1, 8, 8)))
    assert lb._patch_geometry(prefix, shapes) == [lb._Window((5, 5), (2, 2), (2, 2)),
                                                  lb._Window((3, 3), (2, 2), (1, 1))]


PATCH_NETWORKS = {
    "channels_change_between_convs": (  # conv -> conv with other channel counts: maps p + 1 and p + 2 differ
        [nn.Conv2d(1, 3, 3, padding=1), nn.Conv2d(3, 5, 3, stride=2, padding=1), nn.ReLU(),
         nn.Conv2d(5, 2, 3, padding=1), nn.ReLU(), nn.Flatten()],
        (1, 8, 8),
    ),
    "no_biases": (
        [nn.Conv2d(1, 3, 3, padding=1, bias=False), nn.ReLU(), nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=False),
         nn.ReLU(), nn.Conv2d(4, 2, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten()],
        (1, 8, 8),
    ),
}


@pytest.mark.parametrize("name", list(PATCH_NETWORKS))
def test_patches_agree_with_dense_back_substitution_here_too(name, monkeypatch):
    torch.manual_seed(0)
    layers, shape = PATCH_NETWORKS[name]
    box = _random_box(shape, n=3)
    prefix = layers[:-2]
    assert lb._patch_geometry(prefix, lb._shapes(prefix, box)) is not None
    patches = linear_bounds(layers, box, intermediate="crown", direction="backward")
    _assert_contains_samples(nn.Sequential(*layers), box, patches)
    monkeypatch.setattr(lb, "_patch_geometry", lambda prefix, shapes: None)
    dense = linear_bounds(layers, box, intermediate="crown", direction="backward")
    torch.testing.assert_close(patches.lower, dense.lower, rtol=0, atol=1e-5)
    torch.testing.assert_close(patches.upper, dense.upper, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- chunks, dtypes, messages


@pytest.mark.parametrize("direction", ["backward", "forward"])
@pytest.mark.parametrize("name", ["conv_stack", "relu_stack"])
def test_chunks_of_two_give_the_same_bounds(name, direction, monkeypatch):
    """Chunks of two items (examples, or groups of neurons): the same bounds as one chunk."""
    torch.manual_seed(0)
    layers, shape = LAYERS[name]
    box = _random_box(shape, n=8)  # more examples than the first dimension of an input
    whole = linear_bounds(layers, box, intermediate="crown", direction=direction)
    monkeypatch.setattr(lb, "_chunk_size", lambda per_item_bytes: 2)
    chunked = linear_bounds(layers, box, intermediate="crown", direction=direction)
    torch.testing.assert_close(chunked.lower, whole.lower)
    torch.testing.assert_close(chunked.upper, whole.upper)


@pytest.mark.parametrize("intermediate, direction", [("crown", "backward"), ("crown", "forward"), ("ibp", "forward")])
@pytest.mark.parametrize("name", ["conv_stack", "relu_stack", "network"])
def test_float64_networks_are_bounded_in_float64(name, intermediate, direction):
    torch.manual_seed(0)
    layers, shape = LAYERS[name]
    layers = [copy.deepcopy(layer).double() for layer in layers]  # LAYERS is shared: a copy
    box = _random_box(shape)
    box = Interval(box.lower.double(), box.upper.double())
    bounds = linear_bounds(layers, box, intermediate=intermediate, direction=direction)
    assert bounds.lower.dtype == bounds.upper.dtype == torch.float64
    _assert_contains_samples(nn.Sequential(*layers), box, bounds, tol=1e-9)


def test_a_layer_that_mixes_the_batch_is_named():
    with pytest.raises(TypeError, match=r"^layer Flatten\(start_dim=0, end_dim=-1\) mixes the batch dimension"):
        linear_bounds([nn.Flatten(0)], Interval.point(torch.zeros(2, 3)))


def test_back_affine_names_the_shapes_it_got_and_expected():
    with pytest.raises(ValueError, match=r"gave shape \(3,\), expected \(4,\)$"):
        lb._back_affine(nn.Linear(3, 2), torch.ones(5, 2), torch.Size([4]))


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_an_affine_encoder_gets_the_exact_range_of_both_heads(direction):
    """Encoder Linear(3, 4), Linear(4, 2); heads mu (2 outputs) and log sigma (1): the heads' outputs
    are affine in x, so their bounds are its exact range (a network whose last layer changes the shape)."""
    torch.manual_seed(0)
    model = HandVAE()
    model.encoder = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    model.mu_head, model.log_sigma_head = nn.Linear(2, 2), nn.Linear(2, 1)
    box = _random_box((3,), n=2)
    mu, log_sigma = encoder_intervals(model, box, direction=direction)
    for bounds, head in ((mu, model.mu_head), (log_sigma, model.log_sigma_head)):
        exact = exact_affine_range(nn.Sequential(model.encoder, head), box)
        torch.testing.assert_close(bounds.lower, exact.lower, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bounds.upper, exact.upper, rtol=1e-5, atol=1e-5)
