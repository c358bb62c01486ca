"""Linear relaxation bounds (CROWN / CROWN-IBP): sound, never looser than IBP, exact at eps = 0."""

import itertools

import pytest
import torch
from torch import nn

import provae.linear_bounds as lb
from provae import elbo, elbo_lower_bound, make_model, pgd_attack
from provae.bounds import input_box
from provae.interval import Interval, propagate
from provae.linear_bounds import (crown_elbo_lower_bound, decoder_interval, encoder_intervals, linear_bounds,
                                  relu_relaxation)

from conftest import small_model, synthetic_images

OPTIONS = list(itertools.product(["ibp", "crown"], ["backward", "forward"]))


def _ibp(layers, box):
    return propagate(nn.Sequential(*layers) if isinstance(layers, list) else layers, box)


def _random_box(shape, n=4, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    center = torch.randn((n, *shape), generator=g)
    radius = torch.rand((n, *shape), generator=g) * scale
    return Interval(center - radius, center + radius)


def _assert_contains_samples(fn, box, bounds, samples=100, tol=1e-5, seed=1):
    """Uniform points and corners of the box stay inside the bounds (corners are where wrong rules
    fail first). All samples go through ``fn`` in one batch."""
    g = torch.Generator().manual_seed(seed)
    n = box.lower.shape[0]
    u = torch.rand((samples, *box.lower.shape), generator=g)
    corner = torch.arange(samples).view(-1, *[1] * box.lower.dim()) % 2 == 1
    points = torch.where(corner, torch.where(u < 0.5, box.lower, box.upper), box.lower + u * (box.upper - box.lower))
    with torch.no_grad():
        values = fn(points.reshape(samples * n, *box.lower.shape[1:]))
    assert bounds.contains(values.view(samples, *bounds.lower.shape), tol=tol)


def _assert_inside(inner: Interval, outer: Interval, tol=1e-5):
    assert bool((inner.lower >= outer.lower - tol).all() & (inner.upper <= outer.upper + tol).all())


def test_relu_relaxation_by_hand():
    # l=-1, u=3: upper line through (-1, 0) and (3, 3): slope 3/4, intercept 3/4; u >= -l: lower y = x.
    # l=-3, u=1: lower y = 0. Active: y = x both; inactive: 0 both.
    r = relu_relaxation(Interval(torch.tensor([-1.0, -3.0, 0.5, -2.0]), torch.tensor([3.0, 1.0, 2.0, -0.5])))
    torch.testing.assert_close(r.upper_slope, torch.tensor([0.75, 0.25, 1.0, 0.0]))
    torch.testing.assert_close(r.upper_intercept, torch.tensor([0.75, 0.75, 0.0, 0.0]))
    torch.testing.assert_close(r.lower_slope, torch.tensor([1.0, 0.0, 1.0, 0.0]))


def test_relu_relaxation_at_the_boundaries():
    """l = 0 is active (y = y), u = 0 inactive (y = 0); at u = -l the lower line is y = x (ties go to x)."""
    r = relu_relaxation(Interval(torch.tensor([0.0, -1.0, -2.0]), torch.tensor([2.0, 0.0, 2.0])))
    assert r.upper_slope.tolist() == [1.0, 0.0, 0.5] and r.upper_intercept.tolist() == [0.0, 0.0, 1.0]
    assert r.lower_slope.tolist() == [1.0, 0.0, 1.0]


def test_relu_relaxation_where_the_intercept_overflows():
    """-l u above float32's range: the same line, from the slope (method in relu_relaxation's docstring).
    l = -1e30, u = 3e30: slope 3/4, intercept 7.5e29. u - l overflowing too (l = -3e38, u = 3e38) or
    l = -inf: slope 0 and the line y = u, above relu on the whole interval."""
    r = relu_relaxation(Interval(torch.tensor([-1e30, -3e38, -float("inf")]), torch.tensor([3e30, 3e38, 2.0])))
    torch.testing.assert_close(r.upper_slope, torch.tensor([0.75, 0.0, 0.0]))
    torch.testing.assert_close(r.upper_intercept, torch.tensor([7.5e29, 3e38, 2.0]))
    assert torch.isfinite(r.upper_intercept).all()


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_cancellation_by_hand(direction):
    """y = relu(x) - relu(x) on x in [-1, 2]: IBP gives [-2, 2]; the relaxation (slope 2/3,
    intercept 2/3 above, y = x below) gives x/3 - 2/3 <= y <= -x/3 + 2/3, i.e. [-1, 1]."""
    first, second = nn.Linear(1, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.fill_(1.0), first.bias.zero_()
        second.weight.copy_(torch.tensor([[1.0, -1.0]])), second.bias.zero_()
    net = nn.Sequential(first, nn.ReLU(), second)
    box = Interval(torch.tensor([[-1.0]]), torch.tensor([[2.0]]))
    ibp = _ibp(net, box)
    assert (ibp.lower.item(), ibp.upper.item()) == (-2.0, 2.0)
    for intermediate in ("ibp", "crown"):
        out = linear_bounds(net, box, intermediate=intermediate, direction=direction)
        assert out.lower.item() == pytest.approx(-1.0) and out.upper.item() == pytest.approx(1.0)


LAYERS = {
    "linear": ([nn.Linear(12, 7)], (12,)),
    "conv2d": ([nn.Conv2d(2, 3, 4, stride=2, padding=1)], (2, 6, 6)),
    "conv_transpose2d": ([nn.ConvTranspose2d(3, 2, 4, stride=2, padding=1)], (3, 3, 3)),
    "conv_transpose2d_output_padding": ([nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1)], (2, 3, 3)),
    "relu": ([nn.ReLU()], (5,)),
    "relu_stack": ([nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3), nn.ReLU()], (6,)),
    "sigmoid_at_end": ([nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.Sigmoid()], (6,)),
    "reshapes": ([nn.Flatten(), nn.Linear(18, 6), nn.ReLU(), nn.Unflatten(1, (1, 2, 3))], (2, 3, 3)),
    "conv_stack": (  # odd sizes, non-square kernels: the patches path and its grid bookkeeping
        [nn.Conv2d(2, 5, (3, 2), stride=(1, 2), padding=(2, 0)), nn.ReLU(), nn.Conv2d(5, 4, 3, stride=2, padding=1),
         nn.ReLU(), nn.Conv2d(4, 3, 2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(72, 4)],
        (2, 11, 9),
    ),
    "conv_conv": (  # two convolutions back to back: their windows over the padding must be dropped
        [nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
         nn.Conv2d(4, 2, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten()],
        (1, 12, 12),
    ),
    "network": (
        [nn.Conv2d(1, 4, 4, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 32), nn.ReLU(),
         nn.Unflatten(1, (2, 4, 4)), nn.ConvTranspose2d(2, 1, 4, stride=2, padding=1), nn.Sigmoid()],
        (1, 8, 8),
    ),
}


@pytest.mark.parametrize("intermediate, direction", OPTIONS)
@pytest.mark.parametrize("name", list(LAYERS))
def test_points_inside_the_box_land_inside_the_bounds(name, intermediate, direction):
    torch.manual_seed(0)
    layers, shape = LAYERS[name]
    net = nn.Sequential(*layers)
    box = _random_box(shape)
    bounds = linear_bounds(layers, box, intermediate=intermediate, direction=direction)
    _assert_contains_samples(net, box, bounds)
    # Clamped into IBP boxes, some recomputed from tightened layers: never looser, up to float rounding.
    _assert_inside(bounds, _ibp(net, box), tol=1e-6)


@pytest.mark.parametrize("name", ["conv_stack", "conv_conv"])
def test_patches_agree_with_dense_back_substitution(name, monkeypatch):
    torch.manual_seed(0)
    layers, shape = LAYERS[name]
    box = _random_box(shape)
    patches = linear_bounds(layers, box, intermediate="crown", direction="backward")
    monkeypatch.setattr(lb, "_patch_geometry", lambda prefix, shapes: None)
    dense = linear_bounds(layers, box, intermediate="crown", direction="backward")
    torch.testing.assert_close(patches.lower, dense.lower, rtol=0, atol=1e-5)
    torch.testing.assert_close(patches.upper, dense.upper, rtol=0, atol=1e-5)


@pytest.mark.parametrize("intermediate, direction", OPTIONS)
def test_chunks_give_the_same_bounds(intermediate, direction, monkeypatch):
    torch.manual_seed(0)
    layers, shape = LAYERS["conv_stack"]
    box = _random_box(shape, n=2)
    whole = linear_bounds(layers, box, intermediate=intermediate, direction=direction)
    monkeypatch.setattr(lb, "MEMORY_BUDGET_BYTES", 1)  # one example (or neuron) per chunk
    chunked = linear_bounds(layers, box, intermediate=intermediate, direction=direction)
    torch.testing.assert_close(chunked.lower, whole.lower)
    torch.testing.assert_close(chunked.upper, whole.upper)


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_brute_force_on_a_2d_input(intermediate):
    """Dense grid over a 2-d box: the bounds enclose the network's range, closer than IBP's."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 1))
    box = Interval(torch.tensor([[-0.3, 0.2]]), torch.tensor([[0.5, 0.9]]))
    axes = [torch.linspace(box.lower[0, i].item(), box.upper[0, i].item(), 301) for i in range(2)]
    with torch.no_grad():
        values = net(torch.cartesian_prod(*axes))
    true_min, true_max = values.min().item(), values.max().item()
    ibp = _ibp(net, box)
    for direction in ("backward", "forward"):
        out = linear_bounds(net, box, intermediate=intermediate, direction=direction)
        assert out.lower.item() <= true_min + 1e-6 and out.upper.item() >= true_max - 1e-6
        assert true_min - out.lower.item() < true_min - ibp.lower.item()
        assert out.upper.item() - true_max < ibp.upper.item() - true_max


@pytest.mark.parametrize("intermediate, direction", OPTIONS)
def test_whole_encoder_and_decoder_are_sound(intermediate, direction):
    model, x = small_model(), synthetic_images(4)
    box = input_box(x, 0.05)
    mu, log_sigma = encoder_intervals(model, box, intermediate=intermediate, direction=direction)
    _assert_contains_samples(lambda v: torch.cat(model.encode(v), 1), box, Interval(
        torch.cat([mu.lower, log_sigma.lower], 1), torch.cat([mu.upper, log_sigma.upper], 1)))
    latent = Interval(mu.lower, mu.upper)
    decoded = decoder_interval(model, latent, intermediate=intermediate, direction=direction)
    _assert_contains_samples(model.decode, latent, decoded)
    _assert_inside(decoded, propagate(model.decoder, latent), tol=1e-6)  # float rounding only


def test_paper_architecture_is_sound():
    """The MNIST architecture (28 -> 14 -> 7 maps: the patches' real geometry), default options."""
    torch.manual_seed(0)
    model = make_model("mnist")
    box = input_box(torch.rand(2, *model.config.image_shape), 0.02)
    mu, log_sigma = encoder_intervals(model, box)
    _assert_contains_samples(lambda v: torch.cat(model.encode(v), 1), box, Interval(
        torch.cat([mu.lower, log_sigma.lower], 1), torch.cat([mu.upper, log_sigma.upper], 1)), samples=20, tol=1e-4)
    latent = Interval(mu.lower, mu.upper)
    _assert_contains_samples(model.decode, latent, decoder_interval(model, latent), samples=20)


def test_tighter_than_ibp_on_a_small_vae():
    """Same noise, eps 0.05: the gap between the ELBO and the certificate shrinks well below IBP's."""
    model, x = small_model(), synthetic_images(16)
    noise = torch.randn((16, model.latent_dim), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        clean, ibp = elbo(model, x, noise), elbo_lower_bound(model, x, 0.05, noise)
        for intermediate in ("ibp", "crown"):
            crown = crown_elbo_lower_bound(model, x, 0.05, noise, intermediate=intermediate)
            assert (crown >= ibp - 1e-5 * ibp.abs()).all()
            assert (clean - crown).mean() < 0.75 * (clean - ibp).mean()


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_bound_at_eps_zero_equals_elbo(dataset):
    torch.manual_seed(0)
    model = make_model(dataset)
    x = torch.rand(2, *model.config.image_shape)
    noise = torch.randn(2, model.latent_dim)
    with torch.no_grad():
        for intermediate in ("ibp", "crown"):
            torch.testing.assert_close(crown_elbo_lower_bound(model, x, 0.0, noise, intermediate=intermediate),
                                       elbo(model, x, noise), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("intermediate", ["ibp", "crown"])
def test_bound_at_a_tiny_eps_is_the_relaxation_not_the_clamp(intermediate, monkeypatch):
    """At eps = 0 the clamp into IBP's point box makes the certificate exact whatever the linear
    bounds say, so the test above cannot see them. At eps = 1e-4 the box is small but not a
    point: every ReLU is stable, the relaxation is the network's linearisation, and its certificate
    sits a first-order gap below the ELBO (measured: 0.04 nats) where IBP's is ~100 nats below.
    Without the clamp (``tighten`` made the identity) the certificate is the same: it comes from
    the linear bounds themselves, in both directions (the encoder's backward, the decoder's forward)."""
    torch.manual_seed(0)
    model = make_model("mnist")
    x = torch.rand(2, *model.config.image_shape)
    noise = torch.randn(2, model.latent_dim)
    with torch.no_grad():
        clean, ibp = elbo(model, x, noise), elbo_lower_bound(model, x, 1e-4, noise)
        crown = crown_elbo_lower_bound(model, x, 1e-4, noise, intermediate=intermediate)
        monkeypatch.setattr(lb, "tighten", lambda ibp, lower, upper: Interval(lower, upper))
        unclamped = crown_elbo_lower_bound(model, x, 1e-4, noise, intermediate=intermediate)
    assert (crown < clean).all() and (clean - crown < 0.01 * (clean - ibp)).all()
    torch.testing.assert_close(unclamped, crown, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("direction", ["backward", "forward"])
def test_linear_bounds_at_a_tiny_eps_hug_the_network(direction):
    """The same at the level of one network: at eps = 1e-4 the bounds of the decoder are within a
    first-order margin of its value at the centre, much tighter than IBP's, in each direction."""
    model = small_model()
    torch.manual_seed(1)
    z = torch.randn(3, model.latent_dim)
    box = Interval(z - 1e-4, z + 1e-4)
    with torch.no_grad():
        value = model.decoder[:-1](z)  # before the Sigmoid
        bounds = linear_bounds(model.decoder[:-1], box, direction=direction)
        ibp = propagate(model.decoder[:-1], box)
    assert bounds.contains(value)
    assert ((bounds.upper - bounds.lower) < 0.9 * (ibp.upper - ibp.lower)).any()
    assert (bounds.upper - bounds.lower).max() < 1e-2


@pytest.mark.parametrize("sigma0", [0.5, 2**-0.5, 2.0])
def test_the_relaxations_certificate_with_sigma0(trained_small_model, sigma0):
    """sigma0 != 1 (1/sqrt(2) is the committed grid's): equal to the ELBO at eps 0, below it at
    points of the ball, never below IBP's certificate."""
    model, x = trained_small_model
    g = torch.Generator().manual_seed(11)
    noise = torch.randn((x.shape[0], model.latent_dim), generator=g)
    with torch.no_grad():
        torch.testing.assert_close(crown_elbo_lower_bound(model, x, 0.0, noise, sigma0=sigma0),
                                   elbo(model, x, noise, sigma0), rtol=1e-6, atol=1e-5)
        for clip in (True, False):
            certificate = crown_elbo_lower_bound(model, x, 0.05, noise, sigma0=sigma0, clip=clip)
            ibp = elbo_lower_bound(model, x, 0.05, noise, sigma0, clip)
            assert (certificate >= ibp - 1e-5 * ibp.abs()).all()
            box = input_box(x, 0.05, clip)
            for i in range(10):
                u = torch.rand(x.shape, generator=g)
                point = torch.where(u < 0.5, box.lower, box.upper) if i % 2 else box.lower + u * (box.upper - box.lower)
                assert (elbo(model, point, noise, sigma0) >= certificate - 1e-4 * certificate.abs()).all()


@pytest.mark.parametrize("clip", [True, False])
def test_certificate_holds_in_the_ball(trained_small_model, clip):
    """For x' in the ball (random points, corners, PGD), ELBO(x') >= the certificate (same noise),
    and the certificate sits above IBP's on the same noise."""
    model, x = trained_small_model
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((x.shape[0], model.latent_dim), generator=g)
    eps = 0.05
    with torch.no_grad():
        certificate = crown_elbo_lower_bound(model, x, eps, noise, clip=clip)
        ibp = elbo_lower_bound(model, x, eps, noise, clip=clip)
    assert torch.isfinite(certificate).all()
    assert (certificate >= ibp - 1e-4 * ibp.abs()).all()
    tolerance = 1e-4 * certificate.abs()
    box = input_box(x, eps, clip)
    with torch.no_grad():
        for i in range(40):
            u = torch.rand(x.shape, generator=g)
            point = torch.where(u < 0.5, box.lower, box.upper) if i % 2 else box.lower + u * (box.upper - box.lower)
            assert (elbo(model, point, noise) >= certificate - tolerance).all()
    attacked = pgd_attack(model, x, eps, noise, steps=30, restarts=1, clip=clip, generator=g)
    with torch.no_grad():
        assert (elbo(model, attacked, noise) >= certificate - tolerance).all()


def test_per_example_eps_matches_one_eps_at_a_time():
    model, x = small_model(), synthetic_images(3)
    noise = torch.randn(3, model.latent_dim)
    radii = torch.tensor([0.0, 0.01, 0.05])
    with torch.no_grad():
        together = crown_elbo_lower_bound(model, x, radii, noise)
        apart = torch.cat([crown_elbo_lower_bound(model, x[i : i + 1], float(r), noise[i : i + 1])
                           for i, r in enumerate(radii)])
    torch.testing.assert_close(together, apart)


@pytest.mark.parametrize("layers, match", [
    ([nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 1)], "^no linear relaxation rule for layer Tanh; supported: Conv2d, "
                                                    "ConvTranspose2d, Flatten, Linear, ReLU, Sequential, Sigmoid, Unflatten$"),
    ([nn.Linear(3, 3), nn.Sigmoid(), nn.Linear(3, 1)], "^Sigmoid at position 1 is not the output"),
    ([nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect")], "padding"),
])
def test_unsupported_layers_raise(layers, match):
    box = Interval.point(torch.zeros(1, *((1, 4, 4) if isinstance(layers[0], nn.Conv2d) else (3,))))
    with pytest.raises(TypeError, match=match):
        linear_bounds(layers, box)


def test_a_single_layer_passed_alone_is_bounded():
    layer = nn.Linear(3, 2)
    box = _random_box((3,))
    bounds, ibp = linear_bounds(layer, box), propagate(layer, box)  # one affine layer: IBP is exact
    torch.testing.assert_close(bounds.lower, ibp.lower)
    torch.testing.assert_close(bounds.upper, ibp.upper)


def test_crown_refines_a_relu_after_two_affine_layers():
    """y = relu(W2 W1 x) with W2 W1 = 0: IBP's pre-activation box is [-2, 2], the composed linear map
    is exactly 0. Full CROWN bounds the pre-activation by the composition first (the ReLU becomes
    stable, y = 0); CROWN-IBP keeps IBP's box, whose relaxation gives y <= 1."""
    first, second = nn.Linear(1, 2), nn.Linear(2, 1)
    with torch.no_grad():
        first.weight.copy_(torch.tensor([[1.0], [-1.0]])), first.bias.zero_()
        second.weight.fill_(1.0), second.bias.zero_()
    layers = [first, second, nn.ReLU()]
    box = Interval(torch.tensor([[-1.0]]), torch.tensor([[1.0]]))
    for direction in ("auto", "backward", "forward"):
        crown = linear_bounds(layers, box, direction=direction)  # the default: full CROWN
        assert (crown.lower.item(), crown.upper.item()) == (0.0, 0.0)
        ibp = linear_bounds(layers, box, intermediate="ibp", direction=direction)
        assert (ibp.lower.item(), ibp.upper.item()) == (0.0, 1.0)


@pytest.mark.parametrize("layers, shape, expected", [
    ([nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 10)], (4,), "forward"),  # 4 inputs, 10 outputs
    ([nn.Linear(10, 2), nn.ReLU(), nn.Linear(2, 4)], (10,), "backward"),
    ([nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4)], (4,), "backward"),  # a tie: backward, CROWN's own order
    ([nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16, 8)], (3, 2, 2), "backward"),  # 12 in, 8 out
])
def test_auto_carries_the_fewer_linear_functions(layers, shape, expected, monkeypatch):
    """"auto": forward (one function per input) when the inputs are fewer than the outputs, else backward."""
    used = []
    for name in ("_forward_bounds", "_backward_bounds"):
        monkeypatch.setattr(lb, name, (lambda original, name: lambda *a: used.append(name) or original(*a))(
            getattr(lb, name), name))
    linear_bounds(layers, _random_box(shape, n=2))
    assert used == [f"_{expected}_bounds"]


def test_auto_picks_per_network_of_the_paper_vae(monkeypatch):
    """The MNIST encoder: 784 pixels in, mu and log sigma (100) out of its heads, though its body ends in
    3136 features: backward. Its decoder: 50 latent numbers in, 784 pixels out: forward."""
    used = []
    for name in ("_forward_bounds", "_backward_bounds"):
        monkeypatch.setattr(lb, name, (lambda original, name: lambda *a: used.append(name) or original(*a))(
            getattr(lb, name), name))
    torch.manual_seed(0)
    model = make_model("mnist")
    with torch.no_grad():
        mu, _ = encoder_intervals(model, input_box(torch.rand(1, *model.config.image_shape), 0.01), intermediate="ibp")
        decoder_interval(model, mu, intermediate="ibp")
    assert used == ["_backward_bounds", "_forward_bounds"]


def test_the_relaxations_certificate_is_its_parts(trained_small_model):
    """crown_elbo_lower_bound with each intermediate option is method.md's steps 1-6 on the encoder and
    decoder boxes computed with that option."""
    from provae.bounds import kl_upper_bound, latent_box, reconstruction_upper_bound

    model, x = trained_small_model
    noise = torch.randn((x.shape[0], model.latent_dim), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        for intermediate in ("ibp", "crown"):
            box = input_box(x, 0.05)
            mu, log_sigma = encoder_intervals(model, box, intermediate=intermediate)
            decoded = decoder_interval(model, latent_box(mu, log_sigma, noise), intermediate=intermediate)
            expected = -reconstruction_upper_bound(box, decoded) / 2 - kl_upper_bound(mu, log_sigma)
            assert torch.equal(crown_elbo_lower_bound(model, x, 0.05, noise, intermediate=intermediate), expected)


def test_bad_options_raise():
    box = Interval.point(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="intermediate"):
        linear_bounds([nn.Linear(3, 1)], box, intermediate="alpha")
    with pytest.raises(ValueError, match="direction"):
        linear_bounds([nn.Linear(3, 1)], box, direction="sideways")
