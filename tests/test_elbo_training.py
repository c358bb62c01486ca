"""Training on the ELBO's linear relaxation with IBP's boxes (provae.elbo_crown, CROWN-IBP style;
issue 22): the bound is sound (sampled points, corners and APGD attacks, on the ELBO and on the gap
between the ELBO and the linear function itself, never fall below it, at narrow and wide eps),
equals the ELBO at eps 0, is the audited relaxation of provae.elbo_relaxation on the same boxes,
has finite, non-zero gradients, is never NaN; the "ibp" objective and epoch are bit for bit the
old code path; the mix schedule's endpoints; training on it raises the bound."""

import math
from pathlib import Path

import pytest
import torch

from provae import (EpsSchedule, apgd_attack, attack_starts, elbo, elbo_lower_bound, load_model, make_model,
                    minibatches, train_epoch)
from provae.attacks import apgd_minimize
from provae.bounds import input_box
from provae.elbo_crown import (elbo_crown_ibp_bounds, elbo_crown_ibp_lower_bound, ibp_boxes, linear_elbo_function,
                               relu_lines)
from provae.elbo_relaxation import Boxes, linear_elbo_bound
from provae.interval import Interval
from provae.linear_bounds import RelaxedNetwork, relu_relaxation
from provae.training import NonFiniteLossError, crown_ibp_weight, mean_bound_and_elbo, training_objective

from conftest import small_model, synthetic_images

SIGMA0 = 2**-0.5
ROOT = Path(__file__).resolve().parent.parent
MNIST_MODEL = ROOT / "models" / "mnist" / "eps0.01-seed0.pt"


def _noise(model, n, seed=0):
    return torch.randn((n, model.latent_dim), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def mnist_case():
    """The paper's MNIST architecture (a committed proVAE, eps_train 0.01) on 4 synthetic digits-sized blobs."""
    if not MNIST_MODEL.is_file():
        pytest.skip(f"{MNIST_MODEL} is not checked out")
    return load_model(MNIST_MODEL), synthetic_images(4, size=28, seed=7)


@pytest.fixture(params=["trained", "untrained", "mnist"])
def case(request, trained_small_model, mnist_case):
    if request.param == "trained":
        model, x = trained_small_model
        return model, x[:8]
    if request.param == "untrained":
        return small_model(seed=3), synthetic_images(8, seed=5)
    return mnist_case


def _ball_points(x, eps, clip, count, g):
    """Uniform points and corners of the ball, alternately."""
    box = input_box(x, eps, clip)
    for i in range(count):
        u = torch.rand(x.shape, generator=g)
        yield torch.where(u < 0.5, box.lower, box.upper) if i % 2 else box.lower + u * (box.upper - box.lower)


# --- Soundness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize("eps", [0.01, 0.05, 0.15, 0.5])
def test_bound_and_its_linear_function_hold_in_the_ball(case, eps, clip):
    """At every sampled point and corner of the ball, at APGD's best points against the ELBO (three
    starts, same noise) and against the gap ELBO(x') - (w . x' + w0): the ELBO is >= the linear
    function (pointwise, where a wrong line shows even if the minimum is far too low) and >= the
    bound (and IBP's). eps 0.5 is 50 times the MNIST model's training radius."""
    model, x = case
    noise = _noise(model, x.shape[0], seed=1)
    with torch.no_grad():
        bounds = elbo_crown_ibp_bounds(model, x, eps, noise, SIGMA0, clip)
        boxes = ibp_boxes(model, input_box(x, eps, clip), noise)
        w, w0, _ = linear_elbo_function(model, boxes, noise, 1 / (2 * SIGMA0**2))
    assert not torch.isnan(bounds.linear).any() and not torch.isnan(bounds.ibp).any()
    lowest = bounds.certificate
    tolerance = 1e-4 * (1 + lowest.abs())

    def gap(v):
        return elbo(model, v, noise, SIGMA0) - ((w * v.flatten(1)).sum(1) + w0)

    def check(point):
        with torch.no_grad():
            value = elbo(model, point, noise, SIGMA0)
            assert (value >= lowest - tolerance).all(), (value - lowest).min()
            assert (gap(point) >= -1e-4 * (1 + value.abs())).all(), gap(point).min()

    g = torch.Generator().manual_seed(11)
    for point in _ball_points(x, eps, clip, 20, g):
        check(point)
    for start in attack_starts(model, x, eps, random_starts=1, clip=clip, generator=g):
        check(apgd_attack(model, x, eps, noise, start=start, steps=25, sigma0=SIGMA0, clip=clip, generator=g))
    box = input_box(x, eps, clip)
    worst_gap, _ = apgd_minimize(gap, x, box.lower, box.upper, steps=25, initial_step=2 * eps)
    check(worst_gap)


@pytest.mark.parametrize("head", ["mu", "log_sigma"])
def test_kl_chords_are_below_at_the_corners_of_an_exact_vae(head):
    """A VAE on which every line but the KL's chords is exact at the corners of the ball: one latent
    dimension, the encoder's ReLUs always active (biases +50), the other head and the decoder
    constant (g = 1/2, so the square's chord in d = x' - g touches at every corner). There the gap
    ELBO(x') - (w . x' + w0) is the chord's own, 1/2 (t - a)(b - t) >= 0 for mu (its analogue for
    exp(2 l)); a tangent in its place makes the gap negative at every t but its point, so it fails
    here at the corners that put the head at the ends of its true range."""
    torch.manual_seed(0)
    model = make_model("mnist", image_size=8, latent_dim=1, channels=(4, 8))
    with torch.no_grad():
        for layer in model.encoder:
            if isinstance(layer, torch.nn.Conv2d):
                layer.bias.fill_(50.0)
        (model.log_sigma_head if head == "mu" else model.mu_head).weight.zero_()
        for parameter in model.decoder.parameters():
            parameter.zero_()
    x, eps = synthetic_images(4, seed=3), 0.3
    with torch.no_grad():  # the head about 0 at x (l about -24 with those biases: exp(2 l) would vanish)
        moved = getattr(model, f"{head}_head")
        moved.bias -= moved(model.encoder(x)).mean()
    noise = _noise(model, 4)
    box = input_box(x, eps, False)
    with torch.no_grad():
        boxes = ibp_boxes(model, box, noise)
        assert all((pre.lower > 0).all() for pre in boxes.encoder.pre_activation.values())
        w, w0, _ = linear_elbo_function(model, boxes, noise, 1 / (2 * SIGMA0**2))
    x_grad = x.clone().requires_grad_(True)
    value = model.encode(x_grad)[0 if head == "mu" else 1].sum()
    (slope,) = torch.autograd.grad(value, x_grad)
    corners = [torch.where(slope > 0, box.lower, box.upper), torch.where(slope > 0, box.upper, box.lower)]
    g = torch.Generator().manual_seed(1)
    corners += [torch.where(torch.rand(x.shape, generator=g) < 0.5, box.lower, box.upper) for _ in range(10)]
    with torch.no_grad():
        for corner in corners:
            value = elbo(model, corner, noise, SIGMA0)
            gap = value - ((w * corner.flatten(1)).sum(1) + w0)
            assert (gap >= -1e-5 * (1 + value.abs())).all(), gap


@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_bound_holds_on_a_saturated_decoder(eps):
    """A decoder whose sigmoid is saturated on some pixels (pre-activation about +-40: chord slope
    0, the case that makes log(0) in sigmoid's tangent points) and a wide log sigma head."""
    model, x = small_model(seed=5), synthetic_images(6, seed=8)
    with torch.no_grad():
        model.decoder[-2].bias.copy_(torch.tensor([40.0]))
        model.decoder[-2].weight[:, :, :2] *= -30
        model.log_sigma_head.weight *= 20
    noise = _noise(model, 6, seed=4)
    with torch.no_grad():
        bound = elbo_crown_ibp_lower_bound(model, x, eps, noise, SIGMA0, False)
        g = torch.Generator().manual_seed(2)
        for point in _ball_points(x, eps, False, 20, g):
            assert (elbo(model, point, noise, SIGMA0) >= bound - 1e-4 * (1 + bound.abs())).all()
    assert not torch.isnan(bound).any()


def test_equal_to_the_elbo_at_eps_zero(case):
    model, x = case
    noise = _noise(model, x.shape[0])
    with torch.no_grad():
        bounds = elbo_crown_ibp_bounds(model, x, 0.0, noise, SIGMA0, False)
        value = elbo(model, x, noise, SIGMA0)
    torch.testing.assert_close(bounds.linear, value, rtol=1e-5, atol=1e-4)
    assert torch.equal(bounds.ibp, value)


@pytest.mark.parametrize("clip", [False, True])
def test_ibp_part_is_elbo_lower_bound_bit_for_bit(case, clip):
    model, x = case
    noise = _noise(model, x.shape[0])
    eps = torch.linspace(0.0, 0.2, x.shape[0])
    for radius in (0.05, eps):
        with torch.no_grad():
            assert torch.equal(elbo_crown_ibp_bounds(model, x, radius, noise, SIGMA0, clip).ibp,
                               elbo_lower_bound(model, x, radius, noise, SIGMA0, clip))


@pytest.mark.parametrize("eps", [0.02, 0.15])
def test_same_numbers_as_the_elbo_relaxation_on_the_same_boxes(case, eps):
    """``elbo_relaxation.linear_elbo_bound`` (the audited assembly: polygon plane, relaxations'
    lines, linear_bounds' ReLU relaxation) on IBP's boxes gives the same bound up to rounding: the
    training code's own lines and shortcuts change no number."""
    model, x = case
    noise = _noise(model, x.shape[0], seed=3)
    with torch.no_grad():
        boxes = ibp_boxes(model, input_box(x, eps, False), noise)

        def audited(network):
            relaxations = {p: relu_relaxation(box) for p, box in network.pre_activation.items()}
            return RelaxedNetwork(network.layers, network.shapes, network.pre_activation, relaxations, network.output)

        reference = linear_elbo_bound(model, Boxes(boxes.ball, audited(boxes.encoder), boxes.mu, boxes.log_sigma,
                                                   audited(boxes.decoder), boxes.residual), noise, 1.0)
        mine = elbo_crown_ibp_bounds(model, x, eps, noise, SIGMA0, False).linear
    torch.testing.assert_close(mine, reference, rtol=2e-5, atol=1e-3)


# --- The lines, one at a time ---------------------------------------------------------------------


def _intervals(scale, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = (torch.rand(n, generator=g) * 2 - 1) * scale
    width = torch.rand(n, generator=g) * scale
    kind = torch.arange(n) % 4
    width = torch.where(kind == 1, torch.full_like(width, 1e-4), torch.where(kind == 2, torch.zeros_like(width), width))
    a = torch.where(kind == 3, -width * torch.rand(n, generator=g), a)
    return a, a + width


def _points(a, b, count=64, seed=1):
    u = torch.rand(count, *a.shape, generator=torch.Generator().manual_seed(seed))
    u[0], u[1] = 0.0, 1.0
    return a + u * (b - a)


@pytest.mark.parametrize("scale", [0.5, 5.0, 50.0])
def test_relu_lines_are_crowns_and_bracket_relu(scale):
    a, b = _intervals(scale)
    mine, audited = relu_lines(Interval(a, b)), relu_relaxation(Interval(a, b))
    assert torch.equal(mine.lower_slope, audited.lower_slope)
    point = (a == 0) & (b == 0)
    assert torch.equal(mine.upper_slope[~point], audited.upper_slope[~point])
    torch.testing.assert_close(mine.upper_intercept, audited.upper_intercept, rtol=1e-6, atol=1e-6)
    t = _points(a, b)
    size = 1e-6 * (1 + t.abs() + mine.upper_intercept.abs())
    assert (torch.relu(t) <= mine.upper_slope * t + mine.upper_intercept + size).all()
    assert (torch.relu(t) >= mine.lower_slope * t - size).all()


def test_relu_lines_stay_sound_where_the_width_overflows():
    a, b = torch.tensor([-3e38, -1.0]), torch.tensor([3e38, 2e38])
    lines = relu_lines(Interval(a, b))
    for end in (a, b):
        assert (lines.upper_slope * end + lines.upper_intercept >= torch.relu(end)).all()


def test_relu_lines_have_finite_gradients_where_the_product_overflows():
    """-l u above float32's range, u - l not: a finite line, and (unlike relu_relaxation's
    where-guarded -l u / (u - l)) a finite gradient."""
    a, b = torch.tensor([-1e20, -2.0], requires_grad=True), torch.tensor([1e20, 3.0], requires_grad=True)
    lines = relu_lines(Interval(a, b))
    assert torch.isfinite(lines.upper_slope).all() and torch.isfinite(lines.upper_intercept).all()
    (lines.upper_slope + lines.upper_intercept).sum().backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


# --- Gradients, overflow -------------------------------------------------------------------------


@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_gradients_are_finite_and_non_zero(case, eps):
    model, x = case
    noise = _noise(model, x.shape[0])
    model.zero_grad(set_to_none=True)
    bounds = elbo_crown_ibp_bounds(model, x, eps, noise, SIGMA0, False)
    assert torch.isfinite(bounds.linear).all()
    (-bounds.linear.mean()).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("bias", [60.0, -104.0])
def test_gradient_finite_on_a_saturated_decoder(bias):
    """sigmoid saturated (chord slope 0 or denormal; its tangent points at -+inf through log(0))."""
    model, x = small_model(seed=5), synthetic_images(6, seed=8)
    with torch.no_grad():
        model.decoder[-2].bias.copy_(torch.tensor([bias]))
    objective = training_objective(model, x, 0.05, _noise(model, 6), SIGMA0, bound="elbo_crown", mix=0.5)
    assert torch.isfinite(objective).all()
    (-objective.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_overflow_is_vacuous_never_nan():
    """Weights 1e6 times too large: every box overflows float32; the bounds are -inf, never NaN,
    and a training step on them raises NonFiniteLossError before touching a parameter."""
    model, x = small_model(seed=1), synthetic_images(4, seed=2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1e6)
    noise = _noise(model, 4)
    with torch.no_grad():
        for eps in (0.1, 10.0):
            bounds = elbo_crown_ibp_bounds(model, x, eps, noise, SIGMA0, False)
            assert not torch.isnan(bounds.linear).any() and not torch.isnan(bounds.ibp).any()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLossError):
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.1), [x], EpsSchedule(10.0), epoch=0,
                    steps_per_epoch=1, bound="elbo_crown")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# --- The objective and the schedule --------------------------------------------------------------


def _old_training_objective(model, x, eps, noise, sigma0, clean_weight=0.0, clip=True):
    """provae.training.training_objective before issue 22, verbatim."""
    if not 0.0 <= clean_weight <= 1.0:
        raise ValueError(f"clean_weight must lie in [0, 1], got {clean_weight}")
    if eps == 0.0 or clean_weight == 1.0:
        return elbo(model, x, noise, sigma0)
    bound = elbo_lower_bound(model, x, eps, noise, sigma0, clip)
    if clean_weight == 0.0:
        return bound
    return (1.0 - clean_weight) * bound + clean_weight * elbo(model, x, noise, sigma0)


def _old_train_epoch(model, optimizer, batches, schedule, *, epoch, steps_per_epoch, sigma0, clean_weight, clip,
                     generator):
    """provae.training.train_epoch's loop before issue 22 (CPU: the check every step)."""
    model.train()
    total, count, eps = 0.0, 0, schedule(epoch)
    for step, x in enumerate(batches):
        eps = schedule(epoch + step / steps_per_epoch)
        noise = torch.randn((x.shape[0], model.latent_dim), generator=generator, device=x.device)
        objective = _old_training_objective(model, x, eps, noise, sigma0, clean_weight, clip)
        loss = -objective.mean()
        if not torch.isfinite(loss):
            raise AssertionError
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = total + objective.detach().sum()
        count += x.shape[0]
    return {"objective": float(total) / max(count, 1), "eps": eps}


@pytest.mark.parametrize("clean_weight", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("eps", [0.0, 0.05])
def test_ibp_objective_is_bit_identical_to_the_old_code(trained_small_model, eps, clean_weight):
    model, x = trained_small_model
    noise = _noise(model, x.shape[0])
    old = _old_training_objective(model, x, eps, noise, SIGMA0, clean_weight, False)
    for kwargs in ({}, {"bound": "ibp"}, {"bound": "ibp", "mix": 0.3}):
        assert torch.equal(training_objective(model, x, eps, noise, SIGMA0, clean_weight, False, **kwargs), old)


def test_ibp_training_epochs_are_bit_identical_to_the_old_loop():
    """Same parameters, optimizer state, returned statistics and random-number consumption."""
    data = synthetic_images(96)
    schedule = EpsSchedule(0.05, warmup_epochs=1, ramp_epochs=1)
    runs = []
    for loop in (_old_train_epoch, train_epoch):
        model = small_model(seed=2)
        optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
        g = torch.Generator().manual_seed(5)
        stats = [loop(model, optimizer, minibatches(data, 32, g), schedule, epoch=epoch, steps_per_epoch=3,
                      sigma0=SIGMA0, clean_weight=0.1, clip=False, generator=g) for epoch in range(3)]
        runs.append((model.state_dict(), optimizer.state_dict()["state"], stats, g.get_state()))
    (old_model, old_adam, old_stats, old_g), (new_model, new_adam, new_stats, new_g) = runs
    assert all(torch.equal(old_model[k], new_model[k]) for k in old_model)
    assert all(torch.equal(old_adam[i][k], new_adam[i][k]) for i in old_adam for k in old_adam[i])
    assert old_stats == new_stats and torch.equal(old_g, new_g)


def test_crown_ibp_weight_moves_from_one_to_final_over_the_ramp():
    schedule = EpsSchedule(0.1, warmup_epochs=2, ramp_epochs=8)
    assert [crown_ibp_weight(schedule, p) for p in (0, 1.5, 2)] == [1.0, 1.0, 1.0]
    assert crown_ibp_weight(schedule, 6) == pytest.approx(0.5)
    assert crown_ibp_weight(schedule, 10) == 0.0 and crown_ibp_weight(schedule, 19.9) == 0.0
    assert crown_ibp_weight(schedule, 6, final=0.5) == pytest.approx(0.75)
    assert crown_ibp_weight(schedule, 12, final=0.5) == 0.5
    jump = EpsSchedule(0.1, warmup_epochs=1)
    assert crown_ibp_weight(jump, 0.5) == 1.0 and crown_ibp_weight(jump, 1.0) == 0.0
    with pytest.raises(ValueError):
        crown_ibp_weight(schedule, 3, final=1.5)


def test_elbo_crown_objective_mixes_the_two_bounds(trained_small_model):
    model, x = trained_small_model
    noise = _noise(model, x.shape[0])
    with torch.no_grad():
        both = elbo_crown_ibp_bounds(model, x, 0.05, noise, SIGMA0, False)

        def objective(**kwargs):
            return training_objective(model, x, 0.05, noise, SIGMA0, clip=False, bound="elbo_crown", **kwargs)

        assert torch.equal(objective(mix=0.0), training_objective(model, x, 0.05, noise, SIGMA0, clip=False))
        assert torch.equal(objective(mix=1.0), both.linear)
        torch.testing.assert_close(objective(mix=0.25), 0.25 * both.linear + 0.75 * both.ibp)
        clean = elbo(model, x, noise, SIGMA0)
        torch.testing.assert_close(objective(mix=0.25, clean_weight=0.5),
                                   0.5 * (0.25 * both.linear + 0.75 * both.ibp) + 0.5 * clean)
        assert torch.equal(training_objective(model, x, 0.0, noise, SIGMA0, bound="elbo_crown", mix=0.5), clean)
    assert (both.linear > both.ibp).float().mean() > 0.5  # on this model, tighter than IBP mostly
    for bad in ({"bound": "crown"}, {"bound": "elbo_crown", "mix": 1.5}, {"bound": "elbo_crown", "mix": -0.1}):
        with pytest.raises(ValueError):
            training_objective(model, x, 0.05, noise, SIGMA0, **bad)


def test_training_on_elbo_crown_raises_the_bound():
    model, data = small_model(seed=4), synthetic_images(128)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    schedule = EpsSchedule(eps_train=0.05, warmup_epochs=1, ramp_epochs=2)
    g = torch.Generator().manual_seed(0)
    measure = torch.Generator
    before = mean_bound_and_elbo(model, data, 0.05, sigma0=SIGMA0, generator=measure().manual_seed(1))
    mixes = []
    for epoch in range(4):
        stats = train_epoch(model, optimizer, minibatches(data, 32, g), schedule, epoch=epoch, steps_per_epoch=4,
                            sigma0=SIGMA0, generator=g, bound="elbo_crown")
        mixes.append(stats["mix"])
        assert math.isfinite(stats["objective"])
    after = mean_bound_and_elbo(model, data, 0.05, sigma0=SIGMA0, generator=measure().manual_seed(1))
    assert mixes == pytest.approx([1.0, 0.625, 0.125, 0.0])  # k at each epoch's last step (progress e + 3/4)
    assert after["bound"] > before["bound"] + 0.5 and after["elbo"] >= after["bound"]
    with pytest.raises(ValueError):
        train_epoch(model, optimizer, [data[:4]], schedule, epoch=0, steps_per_epoch=1, bound="crown")
