"""Soundness hygiene of the existing bounds: overflow gives -inf (vacuous), never NaN; finite results
are unchanged; an in-place ReLU never writes into the caller's box."""

import math

import pytest
import torch
from torch import nn

from provae import elbo, elbo_lower_bound
from provae.bounds import input_box, kl_upper_bound, latent_box
from provae.elbo_relaxation import elbo_relaxation_lower_bound
from provae.interval import Interval, propagate
from provae.linear_bounds import crown_elbo_lower_bound, linear_bounds, relu_relaxation, tighten

from conftest import small_model, synthetic_images

inf, nan = math.inf, math.nan


def _exploding_model():
    """The small VAE with its encoder scaled up: its boxes overflow float32 at eps 0.1 (the log
    sigma box reaches ~1e30, exp of it inf, the latent box and every decoder box after it inf)."""
    model = small_model()
    with torch.no_grad():
        for layer in (model.encoder[0], model.encoder[2], model.log_sigma_head, model.mu_head):
            layer.weight.mul_(1e10)
    return model


@pytest.mark.parametrize("clip", [True, False])
def test_overflow_gives_minus_inf_never_nan(clip):
    model, x = _exploding_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for bound in (elbo_lower_bound, crown_elbo_lower_bound, elbo_relaxation_lower_bound):
            values = bound(model, x, 0.1, noise, 2**-0.5, clip)
            assert not torch.isnan(values).any(), bound.__name__
            assert (values == -inf).all(), bound.__name__


def test_the_committed_nan_shape_is_gone():
    """The committed CIFAR-10 VAE's NaNs came from an infinite latent box meeting the decoder's first
    affine layer in center/radius form (inf + -inf); by hand: a box [-inf, 1] through w = [1, -1]."""
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0]]))
        layer.bias.zero_()
    out = propagate(layer, Interval(torch.tensor([[-inf, 0.0]]), torch.tensor([[1.0, 1.0]])))
    assert out.lower.item() == -inf and out.upper.item() == inf  # vacuous (the true upper, 1, is inside)


def test_latent_box_and_kl_of_infinite_ends():
    mu = Interval(torch.tensor([[-inf, 0.0]]), torch.tensor([[1.0, inf]]))
    log_sigma = Interval(torch.tensor([[200.0, 0.0]]), torch.tensor([[inf, inf]]))  # exp(200) = inf in float32
    z = latent_box(mu, log_sigma, torch.tensor([[1.0, -1.0]]))
    assert not torch.isnan(z.lower).any() and not torch.isnan(z.upper).any()
    assert z.lower.tolist() == [[-inf, -inf]] and z.upper.tolist() == [[inf, inf]]
    assert kl_upper_bound(mu, log_sigma).item() == inf  # h(+inf) is +inf, not inf - inf


def test_relu_intercept_is_unchanged_where_finite():
    """Bit for bit the formula -l u / (u - l) the committed results were computed with."""
    g = torch.Generator().manual_seed(0)
    lower = -torch.rand(10000, generator=g) * 10.0 ** torch.randint(-6, 6, (10000,), generator=g)
    upper = torch.rand(10000, generator=g) * 10.0 ** torch.randint(-6, 6, (10000,), generator=g)
    relaxation = relu_relaxation(Interval(lower, upper))
    assert torch.equal(relaxation.upper_intercept, -lower * upper / (upper - lower))
    assert torch.equal(relaxation.upper_slope, upper / (upper - lower))


@pytest.mark.parametrize("lower, upper", [(-1e20, 1e20), (-3e38, 3e38), (-1e30, 1e-30), (-inf, 2.0), (-5e37, 1e10)])
def test_relu_upper_line_where_the_product_overflows(lower, upper):
    """Finite, and above relu at both ends (so above it between them): relu is convex. Up to float32
    rounding of the line's own terms (which the formula for finite products has as well)."""
    relaxation = relu_relaxation(Interval(torch.tensor([lower]), torch.tensor([upper])))
    slope, intercept = relaxation.upper_slope.item(), relaxation.upper_intercept.item()
    assert math.isfinite(slope) and math.isfinite(intercept) and 0 <= slope <= 1
    for y in (lower, upper):
        if math.isfinite(y):
            assert slope * y + intercept >= max(y, 0.0) - 1e-6 * (abs(slope * y) + abs(intercept))
    if lower == -inf:
        assert slope == 0 and intercept == upper


def test_tighten_keeps_ibp_where_the_linear_bound_is_nan():
    ibp = Interval(torch.tensor([-1.0, -2.0]), torch.tensor([1.0, 2.0]))
    out = tighten(ibp, torch.tensor([nan, -1.0]), torch.tensor([0.5, nan]))
    assert out.lower.tolist() == [-1.0, -1.0] and out.upper.tolist() == [0.5, 2.0]


def _first_relu_net(inplace: bool):
    torch.manual_seed(0)
    first = nn.Linear(3, 3)
    return first, nn.Sequential(nn.ReLU(inplace=inplace), first, nn.ReLU(inplace=inplace), nn.Linear(3, 2))


@pytest.mark.parametrize("bound", ["ibp", "crown-backward", "crown-forward"])
def test_an_inplace_relu_leaves_the_box_alone(bound):
    """nn.ReLU(inplace=True) as the first layer used to overwrite the caller's box (propagate applied
    the layer to the box's own tensors): the box changed under the caller, and the bound with it.
    Now the box is untouched and the bound is the one of the out-of-place network."""
    _, inplace = _first_relu_net(True)
    _, plain = _first_relu_net(False)
    box = Interval(torch.tensor([[-1.0, 0.5, -0.2]]), torch.tensor([[0.5, 1.0, 0.3]]))
    saved = Interval(box.lower.clone(), box.upper.clone())

    def run(net):
        if bound == "ibp":
            return propagate(net, box)
        return linear_bounds(net, box, direction=bound.split("-")[1])

    out = run(inplace)
    assert torch.equal(box.lower, saved.lower) and torch.equal(box.upper, saved.upper)
    expected = run(plain)
    assert torch.equal(out.lower, expected.lower) and torch.equal(out.upper, expected.upper)
    g = torch.Generator().manual_seed(1)
    points = box.lower + torch.rand(200, 3, generator=g) * (box.upper - box.lower)
    with torch.no_grad():
        assert out.contains(plain(points), tol=1e-6)


def test_finite_certificates_are_unchanged_at_eps_zero():
    """At eps 0 the IBP certificate is the ELBO exactly, as before."""
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(elbo_lower_bound(model, x, 0.0, noise), elbo(model, x, noise))
        box = input_box(x, 0.05)
        assert torch.isfinite(propagate(model.encoder, box).lower).all()
