"""APGD (Croce & Hein, 2020): the generic minimiser and the ELBO attack built on it."""

import pytest
import torch
from torch.overrides import TorchFunctionMode

from provae import apgd_attack, apgd_minimize, attack_starts, elbo, pgd_attack
from provae.attacks import _eot_objective, _sign_gradient_descent, apgd_checkpoints
from provae.bounds import input_box

from conftest import small_model, synthetic_images


def random_box(batch, dim, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lower = torch.rand((batch, dim), generator=g, dtype=dtype)
    return lower, lower + 0.05 + 0.3 * torch.rand((batch, dim), generator=g, dtype=dtype)


def quadratic(center, weight):
    """f(x) = sum_i w_i (x_i - c_i)^2 per example: its minimiser over a box is clip(c, box)."""
    return lambda x: (weight * (x - center) ** 2).sum(1)


class Recorder:
    """Wraps an objective; keeps every point it was evaluated at and the value it returned."""

    def __init__(self, objective):
        self.objective, self.points, self.values = objective, [], []

    def __call__(self, x):
        value = self.objective(x)
        self.points.append(x.detach().clone())
        self.values.append(value.detach().clone())
        return value


# ---------------------------------------------------------------- the schedule and the update


def test_checkpoints_follow_the_paper():
    # p = 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of the budget (Croce & Hein 2020, sec. 3.2).
    assert apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert apgd_checkpoints(1000) == [220, 410, 570, 700, 800, 870, 930, 990]
    assert apgd_checkpoints(3) == [1, 2, 3]
    assert apgd_checkpoints(0) == []


def test_momentum_step_follows_the_update_rule():
    """On a linear objective far from the box's edge every step moves by exactly eta:
    x1 = x0 - eta (alpha = 1 at the first step), then x2 = x1 - 0.75 eta - 0.25 (x0 - x1) = x1 - eta."""
    x0 = torch.full((2, 3), 0.5, dtype=torch.float64)
    slope = torch.tensor([[1.0, -2.0, 0.5], [-1.0, 3.0, 2.0]], dtype=torch.float64)
    objective = Recorder(lambda x: (slope * x).sum(1))
    apgd_minimize(objective, x0, x0 - 10, x0 + 10, steps=3, initial_step=0.1)
    for k, point in enumerate(objective.points):
        torch.testing.assert_close(point, x0 - 0.1 * k * slope.sign())


def reference_apgd(objective, start, lower, upper, steps, eta, momentum=0.75, rho=0.75):
    """autopgd_base.py's ``attack_single_run`` (l_inf) for minimisation, one example at a time in plain Python.

    ``objective`` must treat examples independently: example b is evaluated as row b of a batch."""
    best_points, best_values = [], []
    for b in range(start.shape[0]):
        def value_and_grad(v):
            v = v.detach().requires_grad_(True)
            value = objective(torch.cat([start[:b], v.unsqueeze(0), start[b + 1:]]))[b]
            return value.item(), torch.autograd.grad(value, v)[0]

        clip = lambda v: torch.maximum(torch.minimum(v, upper[b]), lower[b])  # noqa: E731
        x = clip(start[b])
        loss, grad = value_and_grad(x)
        x_best, loss_best, grad_best = x, loss, grad
        step, x_old = float(eta[b]), x
        k, size_decr, k_min = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
        counter, losses = 0, [loss]
        loss_best_last_check, reduced_last_check = loss_best, True
        for i in range(steps):
            grad2, x_old = x - x_old, x
            a = momentum if i > 0 else 1.0
            z = clip(x - step * grad.sign())
            x = clip(x + (z - x) * a + grad2 * (1 - a))
            loss, grad = value_and_grad(x)
            losses.append(loss)
            if loss < loss_best:
                x_best, loss_best, grad_best = x, loss, grad
            counter += 1
            if counter == k:
                decreases = sum(losses[j] < losses[j - 1] for j in range(len(losses) - k, len(losses)))
                reduce = decreases <= k * rho or (not reduced_last_check and loss_best_last_check <= loss_best)
                reduced_last_check, loss_best_last_check = reduce, loss_best
                if reduce:
                    step, x, grad = step / 2, x_best, grad_best
                k, counter = max(k - size_decr, k_min), 0
        best_points.append(x_best)
        best_values.append(loss_best)
    return torch.stack(best_points), torch.tensor(best_values, dtype=start.dtype)



def bumpy_problem():
    """A box, an objective with many shallow local minima (a quadratic bowl, its centre partly
    outside the box, plus a fine sine), a start inside and APGD's initial step 2 eps."""
    lower, upper = random_box(5, 6, seed=1)
    g = torch.Generator().manual_seed(2)
    center = lower + (upper - lower) * (1.6 * torch.rand(lower.shape, generator=g, dtype=lower.dtype) - 0.3)
    weight = 0.5 + torch.rand(lower.shape, generator=g, dtype=lower.dtype)

    def bumpy(x):
        return (weight * (x - center) ** 2 + 0.002 * torch.sin(40 * x)).sum(1)

    start = lower + (upper - lower) * torch.rand(lower.shape, generator=g, dtype=lower.dtype)
    return lower, upper, bumpy, start, 2 * (upper - lower).mean(1)

@pytest.mark.parametrize("steps", [7, 40])
def test_matches_a_plain_transcription_of_the_reference(steps):
    """Batched, sync-free bookkeeping == the reference's loop, per example, on a bumpy objective."""
    lower, upper, bumpy, start, eta = bumpy_problem()
    expected_x, expected_value = reference_apgd(bumpy, start, lower, upper, steps, eta)
    best_x, best_value = apgd_minimize(bumpy, start, lower, upper, steps=steps, initial_step=eta)
    torch.testing.assert_close(best_x, expected_x)
    torch.testing.assert_close(best_value, expected_value)


# ---------------------------------------------------------------- known optima


def test_linear_objective_reaches_the_best_corner():
    lower, upper = random_box(4, 30)
    slope = torch.randn(lower.shape, generator=torch.Generator().manual_seed(3), dtype=lower.dtype)
    best_x, best_value = apgd_minimize(lambda x: (slope * x).sum(1), (lower + upper) / 2, lower, upper,
                                       steps=10, initial_step=(upper - lower).amax(1))
    corner = torch.where(slope > 0, lower, upper)
    torch.testing.assert_close(best_x, corner)
    torch.testing.assert_close(best_value, (slope * corner).sum(1))


@pytest.mark.parametrize("inside", [True, False], ids=["minimiser_inside", "minimiser_on_the_edge"])
def test_convex_quadratic_reaches_its_minimiser(inside):
    lower, upper = random_box(4, 20)
    g = torch.Generator().manual_seed(4)
    u = torch.rand(lower.shape, generator=g, dtype=lower.dtype)
    # Inside: every coordinate's centre in the box. On the edge: half of them outside it.
    center = lower + (upper - lower) * (0.1 + 0.8 * u if inside else 2 * u - 0.5)
    weight = 0.5 + torch.rand(lower.shape, generator=g, dtype=lower.dtype)
    best_x, best_value = apgd_minimize(quadratic(center, weight), lower, lower, upper, steps=100,
                                       initial_step=(upper - lower).amax(1))
    minimiser = torch.maximum(torch.minimum(center, upper), lower)
    width = (upper - lower).amax()
    # 100 steps halve the step at most 8 times: 2 eps / 2^8 ~ 0.004 of the box's width.
    assert (best_x - minimiser).abs().max() < 0.02 * width
    torch.testing.assert_close(best_value, quadratic(center, weight)(best_x))


def test_beats_fixed_step_pgd_where_a_fixed_step_stalls():
    """Per coordinate, a shallow well near the start and the global minimum far from it. A small
    fixed step (2.5 eps / steps) stays in the well; a large one (2 eps) bounces between the box's
    ends; APGD starts large, leaves the well and halves its step to settle. The same budget of
    gradient evaluations for both (APGD: steps + 1, the start included)."""
    g = torch.Generator().manual_seed(6)
    target = 0.7 + 0.25 * torch.rand((6, 16), generator=g, dtype=torch.float64)
    well = 0.05 + 0.2 * torch.rand((6, 16), generator=g, dtype=torch.float64)

    def objective(x):  # min 0 at the target; >= 0.05 in the well
        return ((x - target) ** 2 - 0.15 * torch.exp(-((x - well) / 0.05) ** 2)).sum(1)

    lower, upper, start = torch.zeros_like(target), torch.ones_like(target), well + 0.01
    for steps in (20, 60):
        eps = 0.5  # the box [0, 1] is B(0.5, 0.5)
        _, apgd_value = apgd_minimize(objective, start, lower, upper, steps=steps, initial_step=2 * eps)
        assert (apgd_value < 0.01).all()
        for step_size in (2 * eps, 2.5 * eps / (steps + 1)):
            pgd_value = objective(_sign_gradient_descent(objective, start, lower, upper, steps + 1, step_size))
            assert (pgd_value > 0.3).all()


# ---------------------------------------------------------------- bookkeeping


def test_returns_the_best_evaluated_point_even_when_the_objective_is_noisy():
    """The result is the point with the lowest value APGD was given (the start included), with that value."""
    lower, upper = random_box(5, 8, seed=7)
    noise_source = torch.Generator().manual_seed(8)
    center = (lower + upper) / 2

    def noisy(x):
        return ((x - center) ** 2).sum(1) + 0.05 * torch.randn(x.shape[0], generator=noise_source, dtype=x.dtype)

    objective = Recorder(noisy)
    best_x, best_value = apgd_minimize(objective, upper, lower, upper, steps=30, initial_step=0.2)
    values, points = torch.stack(objective.values), torch.stack(objective.points)
    assert values.shape[0] == 31  # one evaluation per step, plus the start
    index = values.argmin(0)
    torch.testing.assert_close(best_value, values.min(0).values)
    torch.testing.assert_close(best_x, points[index, torch.arange(5)])
    assert (best_value < values[-1]).any()  # the last iterate is not the answer here


def test_iterates_never_leave_the_box():
    """Every evaluated point and the result, on the ELBO of a small VAE, clipped and unclipped, per-example eps."""
    model, x = small_model(), synthetic_images(6)  # pixels at exactly 0 and 1
    noise = torch.randn((6, model.latent_dim), generator=torch.Generator().manual_seed(0))
    eps = torch.tensor([0.0, 0.02, 0.1, 0.3, 0.6, 1.5])
    for clip in (True, False):
        box = input_box(x, eps, clip)
        objective = Recorder(lambda v: elbo(model, v, noise))
        best_x, _ = apgd_minimize(objective, None, box.lower, box.upper, steps=25, initial_step=2 * eps,
                                  generator=torch.Generator().manual_seed(1))
        for point in [*objective.points, best_x]:
            assert ((point >= box.lower) & (point <= box.upper)).all()
            assert ((point - x).abs() <= eps.view(-1, 1, 1, 1) + 1e-6).all()
        assert (best_x[0] == x[0]).all()  # eps 0: nowhere to go
        if clip:
            assert ((best_x >= 0) & (best_x <= 1)).all()
        else:
            assert (best_x < 0).any() or (best_x > 1).any()  # the unclipped ball does get used


def test_a_start_outside_the_box_is_clipped_into_it():
    lower, upper = random_box(3, 4)
    objective = Recorder(lambda x: x.sum(1))
    apgd_minimize(objective, upper + 1, lower, upper, steps=0, initial_step=0.1)
    torch.testing.assert_close(objective.points[0], upper)


def test_step_loop_never_synchronises_with_the_host():
    """No .item(), bool(tensor), nonzero, boolean-mask indexing, ... per step: such calls would stall a GPU.
    Counted with a torch-function mode: the count must not grow with the number of steps."""
    sync_names = {"__bool__", "item", "__float__", "__int__", "__index__", "nonzero", "argwhere", "tolist",
                  "masked_select", "unique", "numpy", "cpu"}

    class CountSyncs(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.calls = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", str(func))
            masked = name in ("__getitem__", "__setitem__") and any(
                isinstance(a, torch.Tensor) and a.dtype == torch.bool for a in args[1:2])
            if name in sync_names or masked:
                self.calls.append(name)
            return func(*args, **(kwargs or {}))

    model, x = small_model(), synthetic_images(4)
    noise = torch.randn((4, model.latent_dim), generator=torch.Generator().manual_seed(0))
    eps = torch.tensor([0.05, 0.1, 0.2, 0.3])
    counts = []
    for steps in (3, 30):
        with CountSyncs() as mode:
            apgd_attack(model, x, eps, noise, start=x, steps=steps, eot_samples=2,
                        generator=torch.Generator().manual_seed(1))
        counts.append(mode.calls)
    assert counts[0] == counts[1]


# ---------------------------------------------------------------- the ELBO attack


def test_eot_objective_is_the_mean_over_draws_in_one_batched_pass():
    model, x = small_model(), synthetic_images(5)
    noise = torch.randn((5, model.latent_dim))
    objective = _eot_objective(model, noise, 3, 0.7, torch.Generator().manual_seed(9))
    draws = torch.randn((3, 5, model.latent_dim), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        expected = torch.stack([elbo(model, x, draw, 0.7) for draw in draws]).mean(0)
        torch.testing.assert_close(objective(x), expected)
        torch.testing.assert_close(_eot_objective(model, noise, 1, 0.7, None)(x), elbo(model, x, noise, 0.7))


@pytest.mark.parametrize("clip", [True, False])
def test_apgd_attack_never_ends_above_its_start(clip):
    model, x = small_model(), synthetic_images(8)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((8, model.latent_dim), generator=g)
    eps = torch.linspace(0.0, 0.3, 8)
    with torch.no_grad():
        for start in attack_starts(model, x, eps, random_starts=2, clip=clip, generator=g):
            x_adv = apgd_attack(model, x, eps, noise, start=start, steps=15, clip=clip, generator=g)
            box = input_box(x, eps, clip)
            assert ((x_adv >= box.lower) & (x_adv <= box.upper)).all()
            assert (elbo(model, x_adv, noise) <= elbo(model, start, noise)).all()


def test_apgd_attack_lowers_the_elbo_of_a_real_model_more_than_pgd():
    model, x = small_model(), synthetic_images(8)
    noise = torch.randn((8, model.latent_dim), generator=torch.Generator().manual_seed(0))
    x_adv = apgd_attack(model, x, 0.2, noise, start=x, steps=20)
    x_pgd = pgd_attack(model, x, 0.2, noise, steps=21, random_start=False)
    with torch.no_grad():
        attacked, clean = elbo(model, x_adv, noise), elbo(model, x, noise)
        assert (attacked < clean - 1e-3).all()
        assert attacked.mean() <= elbo(model, x_pgd, noise).mean()


def test_attack_starts_are_the_clean_input_the_residual_sign_corner_and_uniform_points():
    model, x = small_model(), synthetic_images(4)
    eps = torch.tensor([0.05, 0.1, 0.2, 0.0])
    starts = attack_starts(model, x, eps, random_starts=3, generator=torch.Generator().manual_seed(0))
    assert len(starts) == 5
    torch.testing.assert_close(starts[0], x)
    box = input_box(x, eps)
    with torch.no_grad():
        reconstruction = model(x)
    far_end = torch.where((box.upper - reconstruction).abs() >= (reconstruction - box.lower).abs(), box.upper, box.lower)
    torch.testing.assert_close(starts[1], far_end)
    for start in starts[2:]:
        assert ((start >= box.lower) & (start <= box.upper)).all()
    assert not torch.equal(starts[2], starts[3])


def test_same_seed_same_result_different_seed_different_starts():
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn((4, model.latent_dim), generator=torch.Generator().manual_seed(0))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        starts = attack_starts(model, x, 0.1, random_starts=1, generator=g)
        # A random start (start=None) and EOT: every draw from the generator.
        return starts, apgd_attack(model, x, 0.1, noise, start=None, steps=6, eot_samples=3, generator=g)

    starts_a, adv_a = run(5)
    starts_b, adv_b = run(5)
    starts_c, adv_c = run(6)
    for a, b in zip(starts_a, starts_b):
        assert torch.equal(a, b)
    assert torch.equal(adv_a, adv_b)
    assert not torch.equal(starts_a[2], starts_c[2])
    assert not torch.equal(adv_a, adv_c)


def test_bad_arguments_are_rejected():
    lower, upper = random_box(2, 3)
    with pytest.raises(ValueError, match="steps"):
        apgd_minimize(lambda x: x.sum(1), lower, lower, upper, steps=-1, initial_step=0.1)
    with pytest.raises(ValueError, match="initial_step"):
        apgd_minimize(lambda x: x.sum(1), lower, lower, upper, steps=1, initial_step=-0.1)
    with pytest.raises(ValueError, match="one value per example"):
        apgd_minimize(lambda x: x.sum(), lower, lower, upper, steps=1, initial_step=0.1)
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match="eot_samples"):
        apgd_attack(model, x, 0.1, torch.zeros(2, model.latent_dim), start=x, eot_samples=0)
