import itertools

import pytest
import torch

from provae import elbo, elbo_lower_bound, kl_divergence, kl_upper_bound, make_model, pgd_attack
from provae.bounds import input_box, latent_box, latent_sample, reconstruction_error, reconstruction_upper_bound
from provae.interval import Interval

from conftest import small_model, synthetic_images


def _grid(lower: float, upper: float, n: int = 9) -> torch.Tensor:
    return torch.linspace(lower, upper, n)


@pytest.mark.parametrize("mu_range, l_range", [((-1.0, 0.5), (-2.0, 0.3)), ((0.2, 0.9), (0.1, 1.0)), ((-2.0, -1.0), (-0.5, -0.1))])
def test_kl_upper_bound_is_the_brute_force_maximum(mu_range, l_range):
    mus, ls = _grid(*mu_range), _grid(*l_range)
    brute = max(kl_divergence(m.view(1, 1), l.view(1, 1)).item() for m, l in itertools.product(mus, ls))
    bound = kl_upper_bound(
        Interval(torch.tensor([[mu_range[0]]]), torch.tensor([[mu_range[1]]])),
        Interval(torch.tensor([[l_range[0]]]), torch.tensor([[l_range[1]]])),
    ).item()
    assert bound >= brute - 1e-6
    assert bound == pytest.approx(brute, abs=1e-5)  # the max sits on the grid's ends


@pytest.mark.parametrize("target, decoded", [((0.2, 0.4), (0.1, 0.9)), ((0.0, 0.1), (0.5, 0.6)), ((0.7, 1.0), (0.0, 0.3))])
def test_reconstruction_upper_bound_is_the_brute_force_maximum(target, decoded):
    brute = max(
        reconstruction_error(t.view(1, 1), g.view(1, 1)).item()
        for t, g in itertools.product(_grid(*target), _grid(*decoded))
    )
    bound = reconstruction_upper_bound(
        Interval(torch.tensor([[target[0]]]), torch.tensor([[target[1]]])),
        Interval(torch.tensor([[decoded[0]]]), torch.tensor([[decoded[1]]])),
    ).item()
    assert bound == pytest.approx(brute, abs=1e-6)


@pytest.mark.parametrize("noise", [-1.3, 0.0, 0.7])
def test_latent_box_contains_every_reparameterised_sample(noise):
    mus, ls = _grid(-0.5, 0.4), _grid(-1.0, 0.5)
    box = latent_box(Interval(torch.tensor([[-0.5]]), torch.tensor([[0.4]])),
                     Interval(torch.tensor([[-1.0]]), torch.tensor([[0.5]])), torch.tensor([[noise]]))
    samples = torch.tensor([latent_sample(m, l, torch.tensor(noise)).item() for m, l in itertools.product(mus, ls)])
    assert box.lower.item() == pytest.approx(samples.min().item(), abs=1e-6)
    assert box.upper.item() == pytest.approx(samples.max().item(), abs=1e-6)


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_bound_at_eps_zero_equals_elbo(dataset):
    torch.manual_seed(0)
    model = make_model(dataset)
    x = torch.rand(4, *model.config.image_shape)
    noise = torch.randn(4, model.latent_dim)
    assert torch.equal(elbo_lower_bound(model, x, 0.0, noise), elbo(model, x, noise))


def test_bound_decreases_as_eps_grows():
    model, x = small_model(), synthetic_images(16)
    noise = torch.randn(16, model.latent_dim)
    bounds = torch.stack([elbo_lower_bound(model, x, eps, noise) for eps in (0.0, 0.001, 0.01, 0.05, 0.1, 0.2)])
    assert (bounds[1:] <= bounds[:-1]).all()
    assert (bounds[-1] < bounds[0]).all()


def test_clipping_tightens_the_bound():
    """Every synthetic image has pixels at 0 (and most at 1): its clipped ball is strictly smaller,
    so its certificate strictly higher. An image whose pixels all lie eps inside [0, 1] has the
    same ball either way, so the same certificate."""
    model, x = small_model(), synthetic_images(16)
    noise = torch.randn(16, model.latent_dim)
    assert ((x < 0.1) | (x > 0.9)).flatten(1).any(1).all()
    assert (elbo_lower_bound(model, x, 0.1, noise, clip=True) > elbo_lower_bound(model, x, 0.1, noise, clip=False)).all()
    inner = 0.2 + 0.6 * x
    assert torch.equal(elbo_lower_bound(model, inner, 0.1, noise, clip=True),
                       elbo_lower_bound(model, inner, 0.1, noise, clip=False))


def test_the_unclipped_ball_reaches_outside_the_unit_cube():
    """The default clip=True keeps the ball in [0, 1]; clip=False (the paper's eq. 15) does not."""
    x = torch.tensor([0.0, 0.05, 0.5, 1.0])
    box = input_box(x, 0.1, clip=False)
    torch.testing.assert_close(box.lower, torch.tensor([-0.1, -0.05, 0.4, 0.9]))
    torch.testing.assert_close(box.upper, torch.tensor([0.1, 0.15, 0.6, 1.1]))
    assert torch.equal(input_box(x, 0.1).lower, input_box(x, 0.1, clip=True).lower)


@pytest.mark.parametrize("sigma0", [0.5, 2**-0.5, 2.0])
def test_elbo_with_sigma0_by_hand(sigma0):
    """ELBO = -||x - g(z)||^2 / (2 sigma0^2) - KL, z = mu + sigma e, written out here."""
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        mu, log_sigma = model.encode(x)
        decoded = model.decode(mu + torch.exp(log_sigma) * noise)
        kl = 0.5 * (mu**2 + torch.exp(2 * log_sigma) - 2 * log_sigma - 1).sum(1)
        expected = -((x - decoded) ** 2).flatten(1).sum(1) / (2 * sigma0**2) - kl
        torch.testing.assert_close(elbo(model, x, noise, sigma0), expected)


@pytest.mark.parametrize("sigma0", [0.5, 2**-0.5, 2.0])
def test_bound_with_sigma0(trained_small_model, sigma0):
    """sigma0 != 1 (1/sqrt(2) is the committed grid's; at 1 a bound that took 1/(2 sigma0) or
    ignored sigma0 in one term would agree): equal to the ELBO at eps 0, below it at points of
    the ball (both balls), and its reconstruction part scales as 1/sigma0^2."""
    model, x = trained_small_model
    g = torch.Generator().manual_seed(5)
    noise = torch.randn((x.shape[0], model.latent_dim), generator=g)
    with torch.no_grad():
        assert torch.equal(elbo_lower_bound(model, x, 0.0, noise, sigma0), elbo(model, x, noise, sigma0))
        for clip in (True, False):
            certificate = elbo_lower_bound(model, x, 0.05, noise, sigma0, clip)
            box = input_box(x, 0.05, clip)
            for i in range(20):
                u = torch.rand(x.shape, generator=g)
                point = torch.where(u < 0.5, box.lower, box.upper) if i % 2 else box.lower + u * (box.upper - box.lower)
                assert (elbo(model, point, noise, sigma0) >= certificate - 1e-4 * certificate.abs()).all()
        # LB = -R_U / (2 sigma0^2) - KL_U: two sigma0 values give R_U and KL_U; a third must agree.
        lb = {s: elbo_lower_bound(model, x, 0.05, noise, s) for s in (1.0, 2.0, sigma0)}
        reconstruction = (lb[2.0] - lb[1.0]) / (1 / 2 - 1 / 8)  # R_U
        torch.testing.assert_close(lb[sigma0], lb[1.0] + reconstruction / 2 - reconstruction / (2 * sigma0**2),
                                   rtol=1e-4, atol=1e-3)


def test_sigma0_scales_the_reconstruction_term():
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim)
    mu, log_sigma = model.encode(x)
    kl = kl_divergence(mu, log_sigma)
    torch.testing.assert_close((elbo(model, x, noise, sigma0=0.5) + kl) / (elbo(model, x, noise, sigma0=1.0) + kl),
                               torch.full((4,), 4.0))


@pytest.mark.parametrize("bad_eps", [-0.01, float("nan"), float("inf")])
def test_bad_eps_is_rejected(bad_eps):
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match="eps"):
        elbo_lower_bound(model, x, bad_eps, torch.zeros(2, model.latent_dim))


@pytest.mark.parametrize("bad_sigma0", [0.0, -1.0])
def test_bad_sigma0_is_rejected(bad_sigma0):
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match=rf"^sigma0 must be > 0, got {bad_sigma0!r}$"):
        elbo_lower_bound(model, x, 0.1, torch.zeros(2, model.latent_dim), sigma0=bad_sigma0)


def test_per_example_eps_is_checked_and_takes_the_images_dtype():
    model, x = small_model(), synthetic_images(3)
    noise = torch.zeros(3, model.latent_dim)
    with pytest.raises(ValueError, match=r"^per-example eps must have shape \(3,\), got \(2,\)$"):
        elbo_lower_bound(model, x, torch.tensor([0.1, 0.1]), noise)
    for bad in ([0.1, -0.1, 0.1], [0.1, float("inf"), 0.1], [0.1, float("nan"), 0.1]):
        with pytest.raises(ValueError, match=r"^eps must be finite and >= 0 for every example$"):
            elbo_lower_bound(model, x, torch.tensor(bad), noise)
    radii = torch.tensor([0.0, 0.05, 0.1], dtype=torch.float64)  # a float64 eps must not turn the bound float64
    box = input_box(x, radii)
    assert box.lower.dtype == box.upper.dtype == torch.float32
    together = elbo_lower_bound(model, x, radii, noise)
    assert together.dtype == torch.float32
    apart = torch.cat([elbo_lower_bound(model, x[i : i + 1], float(r), noise[i : i + 1]) for i, r in enumerate(radii)])
    torch.testing.assert_close(together, apart)


def test_the_default_ball_is_clipped():
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim)
    assert torch.equal(elbo_lower_bound(model, x, 0.1, noise), elbo_lower_bound(model, x, 0.1, noise, clip=True))


def test_noise_of_the_wrong_shape_is_rejected():
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match="noise"):
        elbo(model, x, torch.zeros(2, model.latent_dim + 1))


def test_input_box_is_clipped_to_the_unit_cube():
    x = torch.tensor([0.0, 0.05, 0.5, 1.0])
    box = input_box(x, 0.1)
    torch.testing.assert_close(box.lower, torch.tensor([0.0, 0.0, 0.4, 0.9]))
    torch.testing.assert_close(box.upper, torch.tensor([0.1, 0.15, 0.6, 1.0]))


@pytest.mark.parametrize("eps_attack", [0.01, 0.03, 0.05])
def test_no_attack_beats_the_certificate(trained_small_model, eps_attack):
    """For eps_attack <= eps, neither PGD nor random points in the box go below LB (same noise)."""
    model, x = trained_small_model
    g = torch.Generator().manual_seed(3)
    noise = torch.randn((x.shape[0], model.latent_dim), generator=g)
    with torch.no_grad():
        certificate = elbo_lower_bound(model, x, 0.05, noise)
    assert torch.isfinite(certificate).all()
    x_adv = pgd_attack(model, x, eps_attack, noise, steps=40, restarts=2, generator=g)
    with torch.no_grad():
        assert (elbo(model, x_adv, noise) >= certificate - 1e-4).all()
        box = input_box(x, eps_attack)
        for _ in range(50):
            point = box.lower + torch.rand(x.shape, generator=g) * (box.upper - box.lower)
            assert (elbo(model, point, noise) >= certificate - 1e-4).all()


def test_training_on_the_bound_tightens_it(trained_small_model):
    """Training from the same initialisation shrinks the gap between ELBO and certificate."""
    model, x = trained_small_model
    noise = torch.randn(x.shape[0], model.latent_dim)

    def gap(m):
        with torch.no_grad():
            return (elbo(m, x, noise) - elbo_lower_bound(m, x, 0.05, noise)).mean().item()

    assert 0 < gap(model) < 0.75 * gap(small_model())
