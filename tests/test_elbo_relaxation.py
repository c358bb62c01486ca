"""The linear relaxation of the ELBO itself (provae.elbo_relaxation) and its scalar relaxations
(provae.relaxations): sound (sampled points, corners and attacks never fall below it), exact at
eps 0, never looser than the box-wise certificates, each line valid on wide, narrow, degenerate
and sign-crossing intervals, each step of the assembly and the back-substitution valid pointwise
in its own variables (where a bound's minimum alone, far below the true one, would hide an error)."""

import math

import pytest
import torch
from torch import nn

from provae import apgd_attack, attack_starts, elbo, elbo_lower_bound
from provae.bounds import input_box, kl_divergence
from provae.elbo_relaxation import (elbo_relaxation_bounds, elbo_relaxation_lower_bound, input_boxes, kl_lines,
                                    latent_boxes, latent_lines, reconstruction_plane, sigmoid_lower)
from provae.interval import Interval, propagate
from provae.linear_bounds import (RelaxedNetwork, back_substitute_lower, crown_elbo_lower_bound, decoder_relaxation,
                                  encoder_relaxation, relu_relaxation)
from provae.relaxations import (exp_chord, exp_parallel_point, exp_tangent, sigmoid_chord_slope, sigmoid_lines,
                                square_chord, square_plane_intercept)

from conftest import small_model, synthetic_images

SIGMA0 = 2**-0.5
VARIANTS = [("latent", 0), ("input", 0), ("input", 8)]


# --- Scalar relaxations ------------------------------------------------------------------------


def _intervals(scale: float, seed: int = 0, n: int = 400):
    """Random [a, b]: a quarter each wide, narrow (width 1e-4), degenerate (a == b), crossing 0."""
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, generator=g) * 2 - 1) * scale
    width = torch.rand(n, generator=g) * scale
    kind = torch.arange(n) % 4
    width = torch.where(kind == 1, torch.full_like(width, 1e-4), torch.where(kind == 2, torch.zeros_like(width), width))
    a = torch.where(kind == 3, -width * torch.rand(n, generator=g), a)  # a <= 0 <= a + width
    return a, a + width


def _points(a, b, count: int = 64, seed: int = 1):
    """Both ends and uniform points of every interval: [count, n]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(count, *a.shape, generator=g)
    u[0], u[1] = 0.0, 1.0
    return a + u * (b - a)


def _holds(low, high, line, t):
    """low <= high up to float32 rounding: of the line's own terms (slope t + intercept cancel where
    both are large), and of the values."""
    scale = (line.slope * t).abs() + line.intercept.abs() + low.abs()
    return bool((low <= high + 1e-5 * (1 + scale)).all())


@pytest.mark.parametrize("scale", [0.5, 5.0, 50.0])
def test_square_chord_is_above_and_exact_at_the_ends(scale):
    a, b = _intervals(scale)
    t = _points(a, b)
    line = square_chord(a, b)
    assert _holds(t**2, line(t), line, t)
    torch.testing.assert_close(line(a), a**2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(line(b), b**2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rate", [1.0, 2.0])
@pytest.mark.parametrize("scale", [0.5, 5.0, 20.0])
def test_exp_chord_is_above_and_exact_at_the_ends(rate, scale):
    a, b = _intervals(scale)
    t = _points(a, b)
    line = exp_chord(a, b, rate)
    assert _holds(torch.exp(rate * t), line(t), line, t)
    for end in (a, b):
        assert _holds(line(end), torch.exp(rate * end), line, end)


def _chord_slope64(a, b, rate):
    """The chord's slope in float64, from the same float32 ends: (exp(r b) - exp(r a)) / (b - a),
    r exp(r a) at a == b."""
    a, b = a.double(), b.double()
    width = torch.where(b > a, b - a, torch.ones_like(a))
    return torch.where(b > a, (torch.exp(rate * b) - torch.exp(rate * a)) / width, rate * torch.exp(rate * a))


@pytest.mark.parametrize("rate", [1.0, 2.0])
@pytest.mark.parametrize("scale", [0.5, 5.0, 20.0])
def test_exp_chord_slope_is_the_chords(rate, scale):
    """The slope is the chord's to float32 rounding, on narrow intervals (the expm1 form) and wide
    ones (the difference quotient) alike."""
    a, b = _intervals(scale)
    line = exp_chord(a, b, rate)
    torch.testing.assert_close(line.slope.double(), _chord_slope64(a, b, rate), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("a, b, rate", [(-100.0, -5.0, 2.0), (-50.0, 40.0, 2.0), (-60.0, 60.0, 1.0)])
def test_exp_chord_is_finite_on_wide_intervals(a, b, rate):
    """r (b - a) far above 88, exp(r b) finite: the product form r exp(r a) expm1(r w) / (r w)
    overflows (inf, or 0 * inf = NaN where exp(r a) underflows); the chord is finite, above exp on
    the interval, exact at its ends, and its gradient is finite."""
    a, b = torch.tensor([a], requires_grad=True), torch.tensor([b], requires_grad=True)
    line = exp_chord(a, b, rate)
    assert torch.isfinite(line.slope).all() and torch.isfinite(line.intercept).all()
    torch.testing.assert_close(line.slope.double(), _chord_slope64(a.detach(), b.detach(), rate), rtol=1e-5, atol=0)
    with torch.no_grad():
        t = torch.cat([torch.linspace(a.item(), b.item(), 1001), a, b])
        terms = (line.slope * t).abs() + line.intercept.abs()  # the line's own terms cancel at the low end
        assert (torch.exp(rate * t) <= line(t) + 1e-6 * terms).all()
        torch.testing.assert_close(line(b), torch.exp(rate * b), rtol=1e-5, atol=0)
    (line.slope + line.intercept).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


@pytest.mark.parametrize("scale", [0.5, 5.0, 20.0])
def test_exp_tangent_is_below_everywhere_and_exact_at_its_point(scale):
    a, b = _intervals(scale)
    c = exp_parallel_point(a, b)
    assert bool(((c >= a) & (c <= b)).all())
    line = exp_tangent(c)
    t = _points(a - scale, b + scale)  # a tangent of a convex function holds everywhere, not only in [a, b]
    assert _holds(line(t), torch.exp(t), line, t)
    torch.testing.assert_close(line(c), torch.exp(c), rtol=1e-5, atol=1e-6)


def test_exp_parallel_point_by_hand():
    """On [0, 1] the chord's slope is e - 1: the tangent with that slope touches at log(e - 1)."""
    c = exp_parallel_point(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 2.0]))
    torch.testing.assert_close(c, torch.tensor([math.log(math.e - 1), 2.0]))


def test_exp_parallel_point_is_where_the_tangent_has_the_chords_slope():
    """c = a + log((e^w - 1) / w) (float64 reference), exp(c) = the chord's slope; for w = 120, where
    e^w overflows float32 (the point would be b), finite, with finite gradients."""
    a, b = _intervals(20.0)
    c = exp_parallel_point(a, b)
    w = (b - a).double()
    reference = a.double() + torch.where(w > 0, torch.log(torch.expm1(w) / torch.where(w > 0, w, 1.0)), 0.0)
    torch.testing.assert_close(c.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.exp(c), exp_chord(a, b).slope, rtol=1e-4, atol=1e-6)
    wide_a, wide_b = torch.tensor([-60.0], requires_grad=True), torch.tensor([60.0], requires_grad=True)
    point = exp_parallel_point(wide_a, wide_b)
    point.sum().backward()
    assert torch.isfinite(point).all() and torch.isfinite(wide_a.grad).all() and torch.isfinite(wide_b.grad).all()
    assert point.item() == pytest.approx(60 + math.log1p(-math.exp(-120)) - math.log(120), abs=1e-4)


@pytest.mark.parametrize("scale", [0.5, 5.0, 50.0])
@pytest.mark.parametrize("slopes", ["chord", "random", "zero", "steep"])
def test_sigmoid_lines_bracket_sigmoid_and_touch_it(scale, slopes):
    """Below and above sigmoid on the interval for any slope (chord, random in [0, 1/4], 0, above
    1/4), and each touches it (the intercepts are the extreme gaps, found exactly)."""
    a, b = _intervals(scale)
    slope = {"chord": None, "random": torch.rand(a.shape, generator=torch.Generator().manual_seed(2)) / 4,
             "zero": torch.zeros_like(a), "steep": torch.full_like(a, 0.7)}[slopes]
    below, above = sigmoid_lines(a, b, slope)
    t = _points(a, b, count=2001)
    s = torch.sigmoid(t)
    assert _holds(below(t), s, below, t) and _holds(s, above(t), above, t)
    assert ((above(t) - s).amin(0) < 1e-3).all() and ((s - below(t)).amin(0) < 1e-3).all()


def test_sigmoid_chord_slope_makes_the_chord_where_sigmoid_is_convex():
    a, b = torch.tensor([-6.0, 1.0]), torch.tensor([-1.0, 4.0])
    below, above = sigmoid_lines(a, b)
    slope = sigmoid_chord_slope(a, b)
    chord = torch.sigmoid(a) - slope * a
    torch.testing.assert_close(above.intercept[0], chord[0])  # convex part: the chord is the upper line
    torch.testing.assert_close(below.intercept[1], chord[1])  # concave part: the chord is the lower line


@pytest.mark.parametrize("tilted", [False, True])
def test_reconstruction_planes_are_above_the_square_on_the_polygon(tilted):
    """d^2 <= p d + q g + r at random points of {d in [d_L, d_U], g in [g_L, g_U], d + g in the x box},
    for the chord's slopes and for random tilts; the chord's r is never above -d_L d_U."""
    g = torch.Generator().manual_seed(3)
    n = 2000
    x_low = torch.rand(n, generator=g) * 1.2 - 0.1
    x_high = x_low + torch.rand(n, generator=g) * 0.3 * (torch.arange(n) % 5 != 0)  # a fifth degenerate
    g_low = torch.rand(n, generator=g)
    g_high = torch.minimum(g_low + torch.rand(n, generator=g) * 0.5 * (torch.arange(n) % 7 != 0), torch.ones(n))
    d_low = x_low - g_high + torch.rand(n, generator=g) * 0.2 * (x_high - x_low + g_high - g_low)
    d_high = torch.maximum(x_high - g_low - torch.rand(n, generator=g) * 0.2 * (x_high - x_low + g_high - g_low), d_low)
    p, q = d_low + d_high, torch.zeros(n)
    if tilted:
        p, q = p + torch.randn(n, generator=g), torch.randn(n, generator=g)
    r = square_plane_intercept(p, q, (d_low, d_high), (g_low, g_high), (x_low, x_high))
    if not tilted:
        assert bool((r <= -d_low * d_high + 1e-6).all())
    # Points of the polygon: x and g uniform in their boxes, kept where d = x - g is in its own.
    u, v = torch.rand(400, n, generator=g), torch.rand(400, n, generator=g)
    x, gg = x_low + u * (x_high - x_low), g_low + v * (g_high - g_low)
    d = x - gg
    feasible = (d >= d_low) & (d <= d_high)
    gap = torch.where(feasible, p * d + q * gg + r - d**2, torch.ones_like(d))
    assert feasible.any(0).float().mean() > 0.5 and bool((gap >= -1e-5).all())


# --- Each step of the assembly, in its own variables --------------------------------------------


def _box(shape, scale, seed, point_fraction=0.25):
    """Random boxes, some of them points."""
    g = torch.Generator().manual_seed(seed)
    center = torch.randn(shape, generator=g) * scale
    radius = torch.rand(shape, generator=g) * scale * (torch.rand(shape, generator=g) > point_fraction)
    return Interval(center - radius, center + radius)


def _inside(box: Interval, count: int, seed: int):
    """Points of the box, each coordinate at an end half of the time: [count, *shape]."""
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(count, *box.lower.shape, generator=g)
    ends = torch.where(u < 0.5, box.lower, box.upper)
    at_an_end = torch.rand(count, *box.lower.shape, generator=g) < 0.5
    return torch.where(at_an_end, ends, box.lower + u * (box.upper - box.lower))


def _mixed_signs(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tilted", [False, True])
def test_reconstruction_plane_is_below_the_reconstruction_term(tilted):
    """-s ||x' - g||^2 >= direct . x' + on_g . g + const wherever x', g and d = x' - g are in their boxes."""
    x, g = _box((6, 30), 0.3, 0), _box((6, 30), 0.4, 1)
    slack = torch.rand(6, 30, generator=torch.Generator().manual_seed(2)) * 0.1
    d = Interval(x.lower - g.upper + slack, torch.maximum(x.upper - g.lower - slack, x.lower - g.upper + slack))
    planes = (d.lower + d.upper + _mixed_signs((6, 30), 3), _mixed_signs((6, 30), 4)) if tilted else None
    direct, on_g, const = reconstruction_plane(d, g, x, 0.7, planes)
    xs, gs = _inside(x, 3000, 5), _inside(g, 3000, 6)
    ds = xs - gs
    feasible = (ds >= d.lower) & (ds <= d.upper)
    term = -0.7 * torch.where(feasible, ds**2, 0.0)  # one pixel at a time: infeasible pixels count as 0
    line = torch.where(feasible, direct * xs + on_g * gs, 0.0)
    assert feasible.float().mean() > 0.3
    per_pixel_const = -0.7 * square_plane_intercept(*(planes or (d.lower + d.upper, torch.zeros_like(d.lower))),
                                                    (d.lower, d.upper), (g.lower, g.upper), (x.lower, x.upper))
    torch.testing.assert_close(per_pixel_const.sum(-1), const)
    assert bool((term >= line + torch.where(feasible, per_pixel_const, 0.0) - 1e-5).all())


@pytest.mark.parametrize("slopes", [None, "random"])
def test_sigmoid_lower_is_below(slopes):
    h = _box((5, 40), 4.0, 7)
    on_g = _mixed_signs((5, 40), 8)
    chosen = None if slopes is None else torch.rand(5, 40, generator=torch.Generator().manual_seed(9)) / 4
    on_h, const = sigmoid_lower(on_g, h, chosen)
    hs = _inside(h, 2000, 10)
    assert bool(((on_g * torch.sigmoid(hs)).sum(-1) >= (on_h * hs).sum(-1) + const - 1e-4).all())


@pytest.mark.parametrize("points", [None, "random"])
def test_latent_lines_are_below(points):
    """on_z . (mu + exp(l) e) >= on_m . (mu, l) + const for every mu and every l in its box."""
    log_sigma = _box((5, 6), 1.0, 11)
    on_z, noise = _mixed_signs((5, 6), 12), _mixed_signs((5, 6), 13)
    chosen = None
    if points == "random":
        chosen = log_sigma.lower + torch.rand(5, 6, generator=torch.Generator().manual_seed(14)) * (
            log_sigma.upper - log_sigma.lower)
    on_m, const = latent_lines(on_z, log_sigma, noise, chosen)
    ls, mus = _inside(log_sigma, 3000, 15), _mixed_signs((3000, 5, 6), 16) * 3
    value = (on_z * (mus + torch.exp(ls) * noise)).sum(-1)
    assert bool((value >= (on_m * torch.cat([mus, ls], -1)).sum(-1) + const - 1e-4 * (1 + value.abs())).all())


def test_kl_lines_are_below_minus_the_kl():
    mu, log_sigma = _box((5, 6), 1.5, 17), _box((5, 6), 1.0, 18)
    on_m, const = kl_lines(mu, log_sigma)
    mus, ls = _inside(mu, 3000, 19), _inside(log_sigma, 3000, 20)
    value = -kl_divergence(mus.view(-1, 6), ls.view(-1, 6)).view(3000, 5)
    assert bool((value >= (on_m * torch.cat([mus, ls], -1)).sum(-1) + const - 1e-4 * (1 + value.abs())).all())


def _l_box(shape, scale, seed):
    """Random boxes, the lower end in [-scale, scale]; with scale "wide", l boxes within [-100, 40]
    up to 140 wide (exp(2 l) and exp(l) stay finite; e^{r w} of the product form of their chords
    does not, once r w > 88)."""
    g = torch.Generator().manual_seed(seed)
    if scale == "wide":
        low = -100 * torch.rand(shape, generator=g)
        return Interval(low, low + torch.rand(shape, generator=g) * (40 - low))
    low = (torch.rand(shape, generator=g) * 2 - 1) * scale
    return Interval(low, low + torch.rand(shape, generator=g) * scale)


@pytest.mark.parametrize("scale", [1.0, "wide"])
def test_latent_lines_are_finite_and_below_on_wide_boxes(scale):
    """on_z . (mu + exp(l) e) >= on_m . (mu, l) + const for every mu and every l in its box, also
    on l intervals wide enough that the product form of exp's chord overflows."""
    log_sigma = _l_box((5, 6), scale, 11)
    on_z, noise = _mixed_signs((5, 6), 12), _mixed_signs((5, 6), 13)
    on_m, const = latent_lines(on_z, log_sigma, noise)
    assert torch.isfinite(on_m).all() and torch.isfinite(const).all()
    ls, mus = _inside(log_sigma, 3000, 15), _mixed_signs((3000, 5, 6), 16) * 3
    value = (on_z * (mus + torch.exp(ls) * noise)).sum(-1)
    line = (on_m * torch.cat([mus, ls], -1)).sum(-1) + const
    terms = (on_m * torch.cat([mus, ls], -1)).abs().sum(-1) + const.abs()  # rounding of the line's own terms
    assert bool((value >= line - 1e-5 * (1 + value.abs() + terms)).all())


@pytest.mark.parametrize("scale", [1.0, "wide"])
def test_kl_lines_are_finite_and_below_on_wide_boxes(scale):
    """-KL >= on_m . (mu, l) + const for every mu and every l in their boxes, also on wide l boxes."""
    mu, log_sigma = _l_box((5, 6), 1.5 if scale == 1.0 else 40.0, 17), _l_box((5, 6), scale, 18)
    on_m, const = kl_lines(mu, log_sigma)
    assert torch.isfinite(on_m).all() and torch.isfinite(const).all()
    mus, ls = _inside(mu, 3000, 19), _inside(log_sigma, 3000, 20)
    value = -kl_divergence(mus.view(-1, 6), ls.view(-1, 6)).view(3000, 5)
    line = (on_m * torch.cat([mus, ls], -1)).sum(-1) + const
    terms = (on_m * torch.cat([mus, ls], -1)).abs().sum(-1) + const.abs()
    assert bool((value >= line - 1e-5 * (1 + value.abs() + terms)).all())


def test_back_substitution_through_one_relu_layer_on_a_grid():
    """y = relu(W v + b) on a 2-d box, each neuron alone with coefficient +1 and -1: the lower
    function is below the neuron's value on a 201 x 201 grid (the pre-activation box is exact for
    one layer, so the grid reaches both ends of every neuron's interval, where a line taken for
    the wrong sign fails)."""
    torch.manual_seed(5)
    first = nn.Linear(2, 6)
    box = Interval(torch.tensor([[-1.0, -0.5]]), torch.tensor([[0.8, 1.0]]))
    pre = propagate(first, box)
    assert ((pre.lower < 0) & (pre.upper > 0)).sum() >= 3
    relaxed = RelaxedNetwork([first, nn.ReLU()], [torch.Size([2]), torch.Size([6]), torch.Size([6])], {1: pre},
                             {1: relu_relaxation(pre)}, pre.map_increasing(torch.relu))
    coef = torch.cat([torch.eye(6), -torch.eye(6)]).unsqueeze(0)
    on_input, extra = back_substitute_lower(relaxed, coef, torch.zeros(1, 12))
    axes = [torch.linspace(box.lower[0, i].item(), box.upper[0, i].item(), 201) for i in range(2)]
    grid = torch.cartesian_prod(*axes)
    with torch.no_grad():
        values = torch.relu(first(grid))
    exact = torch.cat([values, -values], 1)
    linear = grid @ on_input[0].T + extra
    assert bool((exact >= linear - 1e-5).all())


@pytest.mark.parametrize("network", ["encoder", "decoder"])
@pytest.mark.parametrize("slopes", ["crown", "random"])
def test_back_substitution_is_below_pointwise(network, slopes):
    """back_substitute_lower's linear function of the input lies below coef . f(v) + const at every
    sampled point of the box, not only at its minimum (a check that the minimum alone, far below the
    true one, would pass): mixed-sign coefficients, CROWN's or random lower slopes, and per-group rows."""
    model = small_model(seed=1)
    g = torch.Generator().manual_seed(21)
    if network == "encoder":
        x = synthetic_images(3, seed=4)
        box = input_box(x, 0.2, clip=False)
        relaxed, _, _ = encoder_relaxation(model, box)
        layers = model.encoder
    else:
        z = torch.randn(3, model.latent_dim, generator=g)
        box = Interval(z - 0.5, z + 0.5)
        relaxed = decoder_relaxation(model, box)
        layers = model.decoder[:-1]
    lower_slopes = None
    if slopes == "random":
        lower_slopes = {p: torch.where((b.lower < 0) & (b.upper > 0), torch.rand(b.lower.shape, generator=g),
                                       relaxed.relaxations[p].lower_slope)
                        for p, b in relaxed.pre_activation.items()}
    assert any(((b.lower < 0) & (b.upper > 0)).any() for b in relaxed.pre_activation.values())
    rows = torch.tensor([2, 0, 1, 2])  # groups of coefficients, each for one example
    coef = torch.randn(4, 5, *relaxed.shapes[-1], generator=g)
    const = torch.randn(4, 5, generator=g)
    on_input, extra = back_substitute_lower(relaxed, coef, const, lower_slopes, rows)
    points = _inside(Interval(box.lower[rows], box.upper[rows]), 300, 22)  # [300, 4, *input]
    with torch.no_grad():
        values = layers(points.flatten(0, 1)).view(300, 4, 1, -1)
    exact = (coef.flatten(2).unsqueeze(0) * values).sum(-1) + const
    linear = (on_input.flatten(2).unsqueeze(0) * points.flatten(2).unsqueeze(2)).sum(-1) + extra
    assert bool((exact >= linear - 1e-4 * (1 + exact.abs())).all())


# --- The certificate -------------------------------------------------------------------------


def _noise(model, n, seed=7):
    return torch.randn((n, model.latent_dim), generator=torch.Generator().manual_seed(seed))


def _ball_points(x, eps, clip, count, g):
    """Uniform points and corners of the ball, alternately."""
    box = input_box(x, eps, clip)
    for i in range(count):
        u = torch.rand(x.shape, generator=g)
        yield torch.where(u < 0.5, box.lower, box.upper) if i % 2 else box.lower + u * (box.upper - box.lower)


@pytest.mark.parametrize("decoder_boxes, steps", VARIANTS)
@pytest.mark.parametrize("clip", [True, False])
@pytest.mark.parametrize("eps", [0.02, 0.05, 0.15])
def test_certificate_holds_in_the_ball(trained_small_model, decoder_boxes, steps, clip, eps):
    """Random points, corners and an APGD attack from three starts (same noise) never fall below
    the linear bound, nor below the certificate; at eps 0.15, three times the training radius."""
    model, x = trained_small_model
    x = x[:12]
    noise = _noise(model, x.shape[0])
    with torch.no_grad():
        bounds = elbo_relaxation_bounds(model, x, eps, noise, SIGMA0, clip, decoder_boxes=decoder_boxes,
                                        slope_steps=steps)
    assert torch.isfinite(bounds.linear).all()
    lowest = torch.maximum(bounds.linear, bounds.certificate)
    tolerance = 1e-4 * lowest.abs()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for point in _ball_points(x, eps, clip, 30, g):
            assert (elbo(model, point, noise, SIGMA0) >= lowest - tolerance).all()
    for start in attack_starts(model, x, eps, random_starts=1, clip=clip, generator=g):
        attacked = apgd_attack(model, x, eps, noise, start=start, steps=40, sigma0=SIGMA0, clip=clip, generator=g)
        with torch.no_grad():
            assert (elbo(model, attacked, noise, SIGMA0) >= lowest - tolerance).all()


@pytest.mark.parametrize("decoder_boxes, steps", VARIANTS)
def test_certificate_holds_on_an_untrained_model(decoder_boxes, steps):
    """An untrained network has other signs and wider boxes than a trained one: the same checks."""
    model, x = small_model(seed=3), synthetic_images(8, seed=5)
    noise = _noise(model, 8, seed=2)
    with torch.no_grad():
        bounds = elbo_relaxation_bounds(model, x, 0.1, noise, SIGMA0, False, decoder_boxes=decoder_boxes,
                                        slope_steps=steps)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for point in _ball_points(x, 0.1, False, 30, g):
            assert (elbo(model, point, noise, SIGMA0) >= bounds.linear - 1e-4 * bounds.linear.abs()).all()
    for start in attack_starts(model, x, 0.1, random_starts=1, clip=False, generator=g):
        attacked = apgd_attack(model, x, 0.1, noise, start=start, steps=40, sigma0=SIGMA0, clip=False, generator=g)
        with torch.no_grad():
            assert (elbo(model, attacked, noise, SIGMA0) >= bounds.linear - 1e-4 * bounds.linear.abs()).all()


@pytest.mark.parametrize("decoder_boxes, steps", VARIANTS)
def test_intermediate_boxes_hold_their_quantities(trained_small_model, decoder_boxes, steps):
    """Every box the relaxation uses (decoder pre-activations, pre-sigmoid h, d = x' - g, mu, l)
    contains its quantity at points of the ball: the whole-VAE boxes are the ones that are new."""
    model, x = trained_small_model
    x, eps = x[:8], 0.1
    noise = _noise(model, x.shape[0])
    ball = input_box(x, eps, False)
    with torch.no_grad():
        boxes = latent_boxes(model, ball, noise)
        if decoder_boxes == "input":
            boxes = input_boxes(model, boxes, noise)
        g = torch.Generator().manual_seed(5)
        for point in _ball_points(x, eps, False, 20, g):
            mu, log_sigma = model.encode(point)
            assert boxes.mu.contains(mu, tol=1e-5) and boxes.log_sigma.contains(log_sigma, tol=1e-5)
            value = mu + torch.exp(log_sigma) * noise
            for position, layer in enumerate(boxes.decoder.layers):
                if position in boxes.decoder.pre_activation:
                    assert boxes.decoder.pre_activation[position].contains(value, tol=1e-5)
                value = layer(value)
            assert boxes.decoder.output.contains(value, tol=1e-5)
            assert boxes.residual.contains(point - torch.sigmoid(value), tol=1e-5)


@pytest.mark.parametrize("decoder_boxes, steps", VARIANTS)
def test_equal_to_the_elbo_at_eps_zero(trained_small_model, decoder_boxes, steps):
    model, x = trained_small_model
    noise = _noise(model, x.shape[0])
    with torch.no_grad():
        bounds = elbo_relaxation_bounds(model, x, 0.0, noise, SIGMA0, decoder_boxes=decoder_boxes, slope_steps=steps)
        clean = elbo(model, x, noise, SIGMA0)
    torch.testing.assert_close(bounds.linear, clean, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(bounds.certificate, clean, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("clip", [True, False])
def test_never_looser_than_the_box_wise_certificates(trained_small_model, clip):
    """The certificate is at least CROWN's and IBP's, per image, and the plain recipe's box-wise
    bound is linear_bounds' certificate bit for bit (the same boxes)."""
    model, x = trained_small_model
    noise = _noise(model, x.shape[0])
    with torch.no_grad():
        for eps in (0.01, 0.05, 0.2):
            crown = crown_elbo_lower_bound(model, x, eps, noise, SIGMA0, clip)
            ibp = elbo_lower_bound(model, x, eps, noise, SIGMA0, clip)
            plain = elbo_relaxation_bounds(model, x, eps, noise, SIGMA0, clip, decoder_boxes="latent")
            assert torch.equal(plain.box_wise, crown) and torch.equal(plain.ibp, ibp)
            for decoder_boxes in ("latent", "input"):
                certificate = elbo_relaxation_lower_bound(model, x, eps, noise, SIGMA0, clip,
                                                          decoder_boxes=decoder_boxes)
                assert (certificate >= crown).all() and (certificate >= ibp).all()


def test_tighter_than_box_wise_and_each_variant_helps():
    """On a small VAE at eps 0.2 (where the box-wise bound is 1.9 nats below the worst sampled ELBO):
    the plain recipe is above CROWN's box-wise certificate, the whole-VAE boxes above the plain
    recipe, and optimised lines above those (means over 16 images; never below, per image)."""
    model, x = small_model(), synthetic_images(16)
    noise = _noise(model, 16, seed=0)
    with torch.no_grad():
        plain = elbo_relaxation_bounds(model, x, 0.2, noise, SIGMA0, False, decoder_boxes="latent")
        whole = elbo_relaxation_bounds(model, x, 0.2, noise, SIGMA0, False, decoder_boxes="input")
        optimised = elbo_relaxation_bounds(model, x, 0.2, noise, SIGMA0, False, decoder_boxes="input", slope_steps=20)
    assert plain.linear.mean() > plain.box_wise.mean() + 0.1
    assert whole.linear.mean() > plain.linear.mean() + 0.02
    assert (optimised.linear >= whole.linear).all() and optimised.linear.mean() > whole.linear.mean()


def test_crown_ibp_intermediate_boxes_are_sound(trained_small_model):
    """intermediate="ibp" (CROWN-IBP's encoder and decoder boxes) is sound too, and never below IBP."""
    model, x = trained_small_model
    noise = _noise(model, x.shape[0])
    with torch.no_grad():
        bounds = elbo_relaxation_bounds(model, x, 0.1, noise, SIGMA0, False, intermediate="ibp")
        assert (bounds.certificate >= bounds.ibp).all()
        for point in _ball_points(x, 0.1, False, 20, torch.Generator().manual_seed(6)):
            assert (elbo(model, point, noise, SIGMA0) >= bounds.linear - 1e-4 * bounds.linear.abs()).all()


def test_per_example_eps_matches_one_eps_at_a_time():
    model, x = small_model(), synthetic_images(3)
    noise = _noise(model, 3)
    radii = torch.tensor([0.0, 0.02, 0.1])
    with torch.no_grad():
        together = elbo_relaxation_lower_bound(model, x, radii, noise, SIGMA0)
        apart = torch.cat([elbo_relaxation_lower_bound(model, x[i : i + 1], float(r), noise[i : i + 1], SIGMA0)
                           for i, r in enumerate(radii)])
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)


def test_bad_arguments_raise():
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match="decoder_boxes"):
        elbo_relaxation_lower_bound(model, x, 0.1, _noise(model, 2), decoder_boxes="z")
    with pytest.raises(ValueError, match="noise"):
        elbo_relaxation_lower_bound(model, x, 0.1, torch.zeros(2, model.latent_dim + 1))
