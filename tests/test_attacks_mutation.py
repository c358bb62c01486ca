"""Behaviour of provae/attacks.py that the older tests left open (reports/mutation.md, issue 21).

Argument checks and their messages, the documented defaults, the generator and ``random_start``
plumbing, the unclipped ball, zero-gradient coordinates, ties, APGD's step bookkeeping, sigma0 and
the latent attack's ``mu_shift`` objective. Small hand-made models on the CPU; seconds in all.
"""

import pytest
import torch
from torch import nn

from provae import apgd_attack, apgd_minimize, attack_starts, elbo, expected_elbo, latent_attack, pgd_attack
from provae.attacks import _eot_objective, _sign_gradient_descent
from provae.bounds import input_box

from conftest import small_model, synthetic_images
from test_apgd import Recorder, bumpy_problem, random_box, reference_apgd
from test_attacks import pixels_away_from_one_half


def constant_decoder_model():
    """mu = 0, log sigma = 0 and g(z) = 0.5 for every input: ELBO_sigma0(x') = -||x' - 0.5||^2 / (2 sigma0^2),
    whatever the noise; minimised at the corner of the box farther from 0.5, pixel by pixel."""
    model = small_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


class LinearEncoderVAE(nn.Module):
    """mu(x) = W (x - 0.5) + b, log sigma = 0, g(z) = 0.5: the ELBO and the latent objectives in closed form.

    Duck-types ``provae.model.VAE`` (``encode``, ``decode``, ``latent_dim``, ``forward``), which is all
    the attacks use."""

    def __init__(self, weight, bias, shape):
        super().__init__()
        self.weight, self.bias, self.shape = weight, bias, shape

    @property
    def latent_dim(self):
        return self.weight.shape[0]

    def encode(self, x):
        mu = (x.flatten(1) - 0.5) @ self.weight.T + self.bias
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return torch.full((z.shape[0], *self.shape), 0.5, dtype=z.dtype)

    def forward(self, x):
        return self.decode(self.encode(x)[0])


class BumpyVAE(nn.Module):
    """mu(x) = x + 0.1 sin(40 x) per pixel (latent dim 16 for 1x4x4 images), log sigma = 0, g(z) = 0.5:
    ELBO(x') = -||x' - 0.5||^2 / (2 sigma0^2) - ||mu(x')||^2 / 2 has local minima inside the box, so
    where an attack ends depends on its start, its step and sigma0 (a monotone ELBO sends every
    run to the same corner). The ELBO does not depend on the noise."""

    shape = (1, 4, 4)
    latent_dim = 16

    def encode(self, x):
        u = x.flatten(1)
        mu = u + 0.1 * torch.sin(40 * u)
        return mu, torch.zeros_like(mu)

    def decode(self, z):
        return torch.full((z.shape[0], *self.shape), 0.5, dtype=z.dtype)

    def forward(self, x):
        return self.decode(self.encode(x)[0])


def bumpy_setting(batch=8):
    """A BumpyVAE and images with pixels at exactly 0 and 1 (where clipping acts)."""
    x = torch.rand((batch, *BumpyVAE.shape), generator=seeded(5))
    x[:, :, 0, 0], x[:, :, 0, 1] = 0.0, 1.0
    return BumpyVAE(), x, torch.randn((batch, BumpyVAE.latent_dim), generator=seeded())


def count_gradient_evaluations(model):
    """Wrap ``model.encode``: the list it returns grows by one per call on an input that needs a
    gradient (one per objective-and-gradient evaluation of an attack; scoring runs without)."""
    calls, encode = [], model.encode

    def counting(x):
        if x.requires_grad:
            calls.append(x.shape[0])
        return encode(x)

    model.encode = counting
    return calls


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- argument checks and messages


def test_a_bad_objective_shape_names_the_batch_size():
    lower, upper = random_box(2, 3)
    with pytest.raises(ValueError, match=r"one value per example, shape \(2,\), got \(\)"):
        apgd_minimize(lambda x: x.sum(), lower, lower, upper, steps=1, initial_step=0.1)


@pytest.mark.parametrize("momentum, rho", [(0.0, 0.75), (-0.5, 0.75), (1.5, 0.75), (2.5, 0.75),
                                           (0.75, -0.1), (0.75, 1.5), (0.75, 2.5)])
def test_apgd_rejects_momentum_outside_0_1_and_rho_outside_0_1(momentum, rho):
    lower, upper = random_box(2, 3)
    with pytest.raises(ValueError, match=rf"need 0 < momentum <= 1 and 0 <= rho <= 1, got {momentum}, {rho}"):
        apgd_minimize(lambda x: x.sum(1), lower, lower, upper, steps=1, initial_step=0.1, momentum=momentum, rho=rho)


def test_apgd_names_initial_step_in_its_message():
    lower, upper = random_box(2, 3)
    with pytest.raises(ValueError, match=r"^initial_step: "):
        apgd_minimize(lambda x: x.sum(1), lower, lower, upper, steps=1, initial_step=-0.1)


def test_attack_starts_reject_a_negative_count_and_accept_zero():
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match=r"random_starts must be >= 0, got -1"):
        attack_starts(model, x, 0.1, random_starts=-1)
    starts = attack_starts(model, x, 0.1, random_starts=0)
    assert len(starts) == 2  # the clean input and the residual-sign corner
    torch.testing.assert_close(starts[0], x)


@pytest.mark.parametrize("attack", [pgd_attack, latent_attack])
def test_restarted_attacks_reject_negative_steps_and_no_restarts(attack):
    model, x = small_model(), synthetic_images(2)
    noise = torch.zeros(2, model.latent_dim)
    with pytest.raises(ValueError, match=r"need steps >= 0, restarts >= 1; got -1, 1"):
        attack(model, x, 0.1, noise, steps=-1)
    with pytest.raises(ValueError, match=r"need steps >= 0, restarts >= 1; got 5, 0"):
        attack(model, x, 0.1, noise, steps=5, restarts=0)
    with pytest.raises(ValueError, match=r"^step_size: "):
        attack(model, x, 0.1, noise, steps=5, step_size=-0.1)


@pytest.mark.parametrize("attack", [pgd_attack, latent_attack])
def test_zero_steps_from_the_clean_input_return_it(attack):
    model, x = small_model(), synthetic_images(3)
    noise = torch.randn((3, model.latent_dim), generator=seeded())
    assert torch.equal(attack(model, x, 0.2, noise, steps=0, random_start=False), x)


def test_expected_elbo_takes_one_sample_and_rejects_none():
    model, x = constant_decoder_model(), synthetic_images(3)
    with torch.no_grad():
        exact = elbo(model, x, torch.zeros(3, model.latent_dim))
    torch.testing.assert_close(expected_elbo(model, x, 1, generator=seeded()), exact)
    with pytest.raises(ValueError, match=r"samples must be >= 1, got 0"):
        expected_elbo(model, x, 0)


# ---------------------------------------------------------------- sigma0


def test_expected_elbo_uses_sigma0():
    """With a noise-free ELBO the Monte Carlo mean is the ELBO itself, at the sigma0 asked for."""
    model, x = constant_decoder_model(), synthetic_images(3)
    with torch.no_grad():
        exact = elbo(model, x, torch.zeros(3, model.latent_dim), sigma0=0.5)
    torch.testing.assert_close(expected_elbo(model, x, 3, sigma0=0.5, generator=seeded()), exact)


def test_pgd_ranks_its_result_by_the_elbo_at_the_given_sigma0():
    """PGD on ELBO_0.1 lowers ELBO_0.1 for every example: its result is compared with the clean input at 0.1."""
    model, x = small_model(), synthetic_images(8)
    noise = torch.randn((8, model.latent_dim), generator=seeded())
    x_adv = pgd_attack(model, x, 0.2, noise, steps=20, sigma0=0.1, generator=seeded(1))
    with torch.no_grad():
        assert (elbo(model, x_adv, noise, sigma0=0.1) < elbo(model, x, noise, sigma0=0.1) - 1e-3).all()


# ---------------------------------------------------------------- documented defaults


def test_default_budgets():
    """100 gradient steps and one restart (pgd, latent); APGD evaluates its start too (101)."""
    model, x = small_model(), synthetic_images(2)
    noise = torch.randn((2, model.latent_dim), generator=seeded())
    for attack, expected in [(lambda: pgd_attack(model, x, 0.1, noise, generator=seeded()), 100),
                             (lambda: latent_attack(model, x, 0.1, noise, generator=seeded()), 100),
                             (lambda: apgd_attack(model, x, 0.1, noise, start=x), 101)]:
        calls = count_gradient_evaluations(model)
        attack()
        assert len(calls) == expected
        del model.encode


def test_default_random_start_sigma0_and_clip():
    """Each default equals passing its documented value, in a setting where the value matters."""
    model, x, noise = bumpy_setting()
    eps = 0.3

    def pgd(**kwargs):
        return pgd_attack(model, x, eps, noise, steps=3, restarts=1, generator=seeded(1), **kwargs)

    def latent(**kwargs):
        return latent_attack(model, x, eps, noise, steps=3, restarts=1, generator=seeded(1), **kwargs)

    def apgd(**kwargs):
        return apgd_attack(model, x, eps, noise, start=x, steps=10, **kwargs)

    for attack in (pgd, latent):
        assert torch.equal(attack(sigma0=1.0), attack(random_start=True, sigma0=1.0))
        assert not torch.equal(attack(random_start=True, sigma0=1.0), attack(random_start=False, sigma0=1.0))
        assert torch.equal(attack(random_start=True), attack(random_start=True, sigma0=1.0))
        assert not torch.equal(attack(random_start=True, sigma0=1.0), attack(random_start=True, sigma0=2.0))
    assert torch.equal(apgd(), apgd(sigma0=1.0, clip=True))
    assert not torch.equal(apgd(sigma0=1.0), apgd(sigma0=2.0))
    assert not torch.equal(apgd(clip=True), apgd(clip=False))


def test_latent_attack_defaults_to_the_kl_objective():
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn((4, model.latent_dim), generator=seeded())
    kl = latent_attack(model, x, 0.2, noise, objective="kl", steps=5, generator=seeded(1))
    assert torch.equal(latent_attack(model, x, 0.2, noise, steps=5, generator=seeded(1)), kl)


@pytest.mark.parametrize("attack", [pgd_attack, latent_attack])
@pytest.mark.parametrize("eps", [0.2, torch.tensor([0.05, 0.1, 0.2, 0.3])])
def test_default_step_is_two_and_a_half_eps_over_steps(attack, eps):
    model, x, noise = bumpy_setting(4)
    default = attack(model, x, eps, noise, steps=4, random_start=False)
    assert torch.equal(default, attack(model, x, eps, noise, steps=4, step_size=2.5 * eps / 4, random_start=False))
    assert not torch.equal(default, attack(model, x, eps, noise, steps=4, step_size=3.5 * eps / 4, random_start=False))


def test_one_default_step_crosses_the_whole_box():
    """steps=1: the default step is 2.5 eps, wider than the box, so one step from any random start
    reaches the known corner of the constant-decoder model."""
    model, x = constant_decoder_model(), pixels_away_from_one_half(6)  # in [0.1, 0.4] or [0.6, 0.9]
    eps = 0.08  # no box reaches 0.5: every start is pushed towards the same end
    box = input_box(x, eps)
    x_adv = pgd_attack(model, x, eps, torch.zeros(6, model.latent_dim), steps=1, generator=seeded(2))
    torch.testing.assert_close(x_adv, torch.where(x >= 0.5, box.upper, box.lower))


# ---------------------------------------------------------------- random numbers


@pytest.mark.parametrize("attack, setting", [
    (lambda m, x, n, g: pgd_attack(m, x, 0.2, n, steps=3, generator=g), bumpy_setting),
    (lambda m, x, n, g: latent_attack(m, x, 0.2, n, steps=3, generator=g), bumpy_setting),
    (lambda m, x, n, g: pgd_attack(m, x, 0.2, n, steps=3, random_start=False, eot_samples=3, generator=g),
     lambda: (small_model(), synthetic_images(6), torch.randn((6, 4), generator=seeded()))),
], ids=["pgd_random_start", "latent_random_start", "pgd_eot"])
def test_restarted_attacks_draw_from_the_generator(attack, setting):
    """Same seed, same result (every draw comes from the generator); another seed, another result."""
    model, x, noise = setting()
    first = attack(model, x, noise, seeded(7))
    assert torch.equal(attack(model, x, noise, seeded(7)), first)  # draws from torch's global one would differ
    assert not torch.equal(attack(model, x, noise, seeded(8)), first)


def test_random_starts_of_a_float64_box_have_float64_resolution():
    """A uniform start is drawn in the box's dtype: not every draw is a multiple of 2^-24 (float32's step)."""
    lower, upper = torch.zeros(4, 50, dtype=torch.float64), torch.ones(4, 50, dtype=torch.float64)
    start, _ = apgd_minimize(lambda x: x.sum(1), None, lower, upper, steps=0, initial_step=0.1, generator=seeded())
    assert start.dtype == torch.float64
    scaled = start * 2**24
    assert ((scaled - scaled.round()).abs() > 1e-3).any()


def test_eot_draws_follow_the_noise_dtype():
    """A float64 model and noise: the EOT mean is over float64 draws from the generator."""
    model, x = small_model().double(), synthetic_images(5).double()
    noise = torch.randn((5, model.latent_dim), dtype=torch.float64)
    objective = _eot_objective(model, noise, 3, 0.7, seeded(9))
    draws = torch.randn((3, 5, model.latent_dim), generator=seeded(9), dtype=torch.float64)
    with torch.no_grad():
        expected = torch.stack([elbo(model, x, draw, 0.7) for draw in draws]).mean(0)
        value = objective(x)
    assert value.dtype == torch.float64
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the unclipped ball


def test_attack_starts_without_clip_use_the_whole_ball():
    model, x = small_model(), synthetic_images(4)  # pixels at exactly 0 and 1
    eps = 0.3
    starts = attack_starts(model, x, eps, random_starts=3, clip=False, generator=seeded())
    torch.testing.assert_close((starts[1] - x).abs(), torch.full_like(x, eps))  # a corner of the plain ball
    for start in starts[2:]:
        assert ((start - x).abs() <= eps + 1e-6).all()
        assert (start < 0).any() and (start > 1).any()


def test_pgd_without_clip_reaches_the_unclipped_corner():
    model, x = constant_decoder_model(), synthetic_images(4)  # pixels at exactly 0 and 1
    x = torch.where((x - 0.5).abs() < 0.02, x + 0.05, x)  # a single farthest end everywhere
    eps = 0.2
    x_adv = pgd_attack(model, x, eps, torch.zeros(4, model.latent_dim), steps=10, random_start=False, clip=False)
    torch.testing.assert_close(x_adv, torch.where(x >= 0.5, x + eps, x - eps))
    assert (x_adv < 0).any() and (x_adv > 1).any()


# ---------------------------------------------------------------- zero gradients and ties


def test_a_coordinate_without_gradient_does_not_move():
    lower, upper = random_box(3, 4)
    start = (lower + upper) / 2
    objective = lambda x: x[:, 0]  # noqa: E731 (only the first coordinate matters)
    pgd = _sign_gradient_descent(objective, start, lower, upper, steps=3, step_size=0.01)
    best_x, _ = apgd_minimize(objective, start, lower, upper, steps=3, initial_step=0.01)
    for result in (pgd, best_x):
        torch.testing.assert_close(result[:, 1:], start[:, 1:])
        assert (result[:, 0] < start[:, 0]).all()


def absolute_distance(center):
    """f(x) = |x - c| (one coordinate): a step of 2h from c + h lands on c - h, a tie."""
    return lambda x: (x - center).abs().sum(1)


def test_apgd_keeps_the_earlier_point_on_a_tie():
    """Strict improvement: the start c + h and the first iterate c - h tie; the start is the answer."""
    center, h = torch.full((2, 1), 0.5, dtype=torch.float64), 0.125
    objective = Recorder(absolute_distance(center))
    best_x, best_value = apgd_minimize(objective, center + h, center - 1, center + 1, steps=1, initial_step=2 * h)
    torch.testing.assert_close(objective.points[1], center - h)  # the tie happened
    torch.testing.assert_close(best_x, center + h)
    torch.testing.assert_close(best_value, torch.full((2,), h, dtype=torch.float64))


@pytest.mark.parametrize("steps", [3, 12])
def test_apgd_matches_the_reference_through_ties(steps):
    """A tie is not a decrease: at the first checkpoint the step is halved and the iterate reset."""
    center, h = torch.full((2, 1), 0.5, dtype=torch.float64), 0.125
    objective = absolute_distance(center)
    start, lower, upper = center + h, center - 1, center + 1
    eta = torch.full((2,), 2 * h, dtype=torch.float64)
    expected_x, expected_value = reference_apgd(objective, start, lower, upper, steps, eta)
    best_x, best_value = apgd_minimize(objective, start, lower, upper, steps=steps, initial_step=eta)
    torch.testing.assert_close(best_x, expected_x)
    torch.testing.assert_close(best_value, expected_value)
    points = Recorder(objective)
    apgd_minimize(points, start, lower, upper, steps=2, initial_step=eta)
    torch.testing.assert_close(points.points[2], center + h / 4)  # x0 + 0.75 (x0 - h - x0): halved, from x0


def test_restarts_keep_the_earlier_result_on_a_tie():
    """Pixels at 0.5 in the constant-decoder model: every corner of the box has the same ELBO, and
    each restart ends at a random one. A later restart never replaces an equally good result."""
    model, x = constant_decoder_model(), torch.full((3, 1, 8, 8), 0.5)
    noise = torch.zeros(3, model.latent_dim)
    one = pgd_attack(model, x, 0.25, noise, steps=4, restarts=1, generator=seeded(3))
    three = pgd_attack(model, x, 0.25, noise, steps=4, restarts=3, generator=seeded(3))
    assert ((one - x).abs() == 0.25).all()  # a corner
    assert torch.equal(three, one)


# ---------------------------------------------------------------- APGD's step bookkeeping


@pytest.mark.parametrize("momentum, rho", [(1.0, 0.75), (0.5, 0.0), (0.75, 1.0), (1.0, 1.0)])
def test_apgd_matches_the_reference_at_the_ends_of_momentum_and_rho(momentum, rho):
    lower, upper, bumpy, start, eta = bumpy_problem()
    for steps in (5, 30):
        expected_x, expected_value = reference_apgd(bumpy, start, lower, upper, steps, eta, momentum, rho)
        best_x, best_value = apgd_minimize(bumpy, start, lower, upper, steps=steps, initial_step=eta,
                                           momentum=momentum, rho=rho)
        torch.testing.assert_close(best_x, expected_x)
        torch.testing.assert_close(best_value, expected_value)


def test_rho_one_halves_the_step_at_the_first_checkpoint():
    """On a linear objective f decreases on every step, which is "at most rho = 1" of them: with 3
    steps (checkpoints after steps 1, 2, 3) the second step is x1 + 0.75 (-eta/2) + 0.25 (x1 - x0)."""
    x0 = torch.full((2, 3), 0.5, dtype=torch.float64)
    slope = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 2.0]], dtype=torch.float64)
    objective = Recorder(lambda x: (slope * x).sum(1))
    apgd_minimize(objective, x0, x0 - 10, x0 + 10, steps=3, initial_step=0.25, rho=1.0)
    x1 = x0 - 0.25 * slope.sign()
    torch.testing.assert_close(objective.points[1], x1)
    torch.testing.assert_close(objective.points[2], x1 - (0.75 * 0.125 + 0.25 * 0.25) * slope.sign())


def test_a_float64_step_stays_float64():
    """initial_step 0.1 moves a float64 point by the float64 0.1, exactly."""
    x0 = torch.full((2, 3), 0.5, dtype=torch.float64)
    objective = Recorder(lambda x: x.sum(1))
    apgd_minimize(objective, x0, x0 - 10, x0 + 10, steps=1, initial_step=0.1)
    torch.testing.assert_close(objective.points[1], x0 - 0.1, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- the ELBO attack's definition


@pytest.mark.parametrize("clip", [True, False])
def test_apgd_attack_is_apgd_on_the_elbo_from_twice_eps(clip):
    """apgd_attack = apgd_minimize of ELBO(noise, sigma0) over input_box(x, eps, clip), initial step 2 eps."""
    model, x, noise = bumpy_setting(6)
    eps = torch.tensor([0.02, 0.05, 0.1, 0.15, 0.2, 0.3])
    box = input_box(x, eps, clip)
    objective = lambda v: elbo(model, v, noise, 0.7)  # noqa: E731
    x_adv = apgd_attack(model, x, eps, noise, start=x, steps=20, sigma0=0.7, clip=clip)
    expected, _ = apgd_minimize(objective, x, box.lower, box.upper, steps=20, initial_step=2 * eps)
    torch.testing.assert_close(x_adv, expected)
    other, _ = apgd_minimize(objective, x, box.lower, box.upper, steps=20, initial_step=3 * eps)
    assert not torch.equal(other, expected)  # the initial step matters here


# ---------------------------------------------------------------- the latent attack's mu_shift objective


def mu_shift_setting(bias):
    """Latent dim 2, mu = (w (x - 0.5), -w (x - 0.5)) + bias; 16 pixels at 0.5; eps = 0.1.

    ||mu(x') - mu(x)||^2 = 2 (w . (x' - x))^2 is largest, 2 (eps ||w||_1)^2, at the two corners
    x +- eps sign(w); the ELBO of any x' != x is below the clean one (bias small next to the
    reconstruction term), so the attack's point is always the one returned."""
    w = torch.linspace(-0.02, 0.02, 16)  # no zero entry
    model = LinearEncoderVAE(torch.stack([w, -w]), bias, (1, 4, 4))
    return model, torch.full((8, 1, 4, 4), 0.5), 0.1, w


def test_mu_shift_moves_the_mean_as_far_as_the_box_allows():
    model, x, eps, w = mu_shift_setting(torch.tensor([0.3, -0.2]))
    x_adv = latent_attack(model, x, eps, torch.zeros(8, 2), objective="mu_shift", steps=10, generator=seeded())
    with torch.no_grad():
        shift = ((model.encode(x_adv)[0] - model.encode(x)[0]) ** 2).sum(1)
    torch.testing.assert_close(shift, torch.full((8,), 2 * (eps * w.abs().sum().item()) ** 2))
    torch.testing.assert_close((x_adv - x).abs(), torch.full_like(x, eps))


def test_mu_shift_ignores_where_the_clean_mean_is():
    """The objective depends on mu(x') - mu(x) only: moving every mean by a constant changes nothing."""
    runs = []
    for bias in (torch.tensor([0.0, 0.0]), torch.tensor([0.5, -0.5])):
        model, x, eps, _ = mu_shift_setting(bias)
        runs.append(latent_attack(model, x, eps, torch.zeros(8, 2), objective="mu_shift", steps=10,
                                  generator=seeded(4)))
    assert torch.equal(runs[0], runs[1])
