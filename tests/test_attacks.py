import pytest
import torch
from torch import nn

from provae import elbo, expected_elbo, kl_divergence, latent_attack, pgd_attack, worst_of
from provae.bounds import input_box

from conftest import small_model, synthetic_images


def constant_decoder_model():
    """Encoder outputs mu = 0, log sigma = 0 (KL = 0); decoder outputs 0.5 everywhere.

    Then ELBO(x') = -||x' - 0.5||^2 / 2, minimised by moving every pixel to the end of its box
    farther from 0.5: the answer is a known corner.
    """
    model = small_model()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def pixels_away_from_one_half(n):
    """Pixels in [0.1, 0.4] or [0.6, 0.9]: a box of radius <= 0.1 then has a single farthest end."""
    u = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(n))
    return torch.where(u < 0.5, 0.1 + 0.6 * u, 0.3 + 0.6 * u)


def test_pgd_reaches_the_known_corner():
    model = constant_decoder_model()
    x = pixels_away_from_one_half(3)
    eps = 0.05
    x_adv = pgd_attack(model, x, eps, torch.zeros(3, model.latent_dim), steps=20, step_size=0.01, random_start=True,
                       generator=torch.Generator().manual_seed(0))
    box = input_box(x, eps)
    corner = torch.where(x >= 0.5, box.upper, box.lower)
    torch.testing.assert_close(x_adv, corner)


def test_pgd_without_random_start_also_reaches_it():
    model = constant_decoder_model()
    x = pixels_away_from_one_half(2)
    x_adv = pgd_attack(model, x, 0.03, torch.zeros(2, model.latent_dim), steps=10, random_start=False)
    box = input_box(x, 0.03)
    torch.testing.assert_close(x_adv, torch.where(x >= 0.5, box.upper, box.lower))


ATTACKS = {
    "pgd": lambda m, x, eps, n, g: pgd_attack(m, x, eps, n, steps=15, restarts=2, generator=g),
    "pgd_eot": lambda m, x, eps, n, g: pgd_attack(m, x, eps, n, steps=5, eot_samples=3, generator=g),
    "latent_kl": lambda m, x, eps, n, g: latent_attack(m, x, eps, n, objective="kl", steps=10, generator=g),
    "latent_mu": lambda m, x, eps, n, g: latent_attack(m, x, eps, n, objective="mu_shift", steps=10, generator=g),
}


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_attacks_stay_in_the_ball_and_the_unit_cube_and_never_raise_the_elbo(name, eps):
    model, x = small_model(), synthetic_images(8)  # includes pixels at exactly 0 and 1
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((8, model.latent_dim), generator=g)
    x_adv = ATTACKS[name](model, x, eps, noise, g)
    assert x_adv.shape == x.shape
    assert ((x_adv - x).abs() <= eps + 1e-6).all()
    assert ((x_adv >= 0) & (x_adv <= 1)).all()
    with torch.no_grad():
        assert (elbo(model, x_adv, noise) <= elbo(model, x, noise) + 1e-5).all()


def test_pgd_lowers_the_elbo_of_a_real_model():
    model, x = small_model(), synthetic_images(8)
    noise = torch.randn(8, model.latent_dim)
    x_adv = pgd_attack(model, x, 0.2, noise, steps=20, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (elbo(model, x_adv, noise) < elbo(model, x, noise) - 1e-3).all()


def test_more_restarts_never_hurt():
    model, x = small_model(), synthetic_images(8)
    noise = torch.randn(8, model.latent_dim)
    one = pgd_attack(model, x, 0.1, noise, steps=3, restarts=1, generator=torch.Generator().manual_seed(5))
    three = pgd_attack(model, x, 0.1, noise, steps=3, restarts=3, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        # The first restart draws the same start from the same seed; later ones can only improve.
        assert (elbo(model, three, noise) <= elbo(model, one, noise) + 1e-6).all()


def test_unknown_latent_objective_is_rejected():
    model, x = small_model(), synthetic_images(2)
    with pytest.raises(ValueError, match="objective"):
        latent_attack(model, x, 0.1, torch.zeros(2, model.latent_dim), objective="entropy")


def test_worst_of_takes_the_lowest_per_example():
    model, x = small_model(), synthetic_images(6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((6, model.latent_dim), generator=g)
    candidates = [x, pgd_attack(model, x, 0.2, noise, steps=10, generator=g)]
    result = worst_of(model, candidates, noise, score_samples=4, generator=torch.Generator().manual_seed(1))

    # Every candidate is scored with the same fresh draws, seeded from the caller's generator.
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(1)))
    fresh = torch.stack([expected_elbo(model, c, 4, generator=torch.Generator().manual_seed(seed)) for c in candidates])
    with torch.no_grad():
        same = torch.stack([elbo(model, c, noise) for c in candidates])
    torch.testing.assert_close(result.candidate_elbos, fresh)
    torch.testing.assert_close(result.elbo, fresh.min(0).values)
    torch.testing.assert_close(result.attack_index, fresh.argmin(0))
    torch.testing.assert_close(result.x_adv, torch.stack(candidates)[fresh.argmin(0), torch.arange(6)])
    torch.testing.assert_close(result.elbo_same_noise, same.min(0).values)


def test_latent_attack_raises_the_kl_when_the_elbo_is_all_kl():
    """With a huge sigma0 the reconstruction term vanishes, ELBO ~ -KL: the KL attack must win."""
    model, x = small_model(), synthetic_images(8)
    noise = torch.randn(8, model.latent_dim)
    x_adv = latent_attack(model, x, 0.1, noise, objective="kl", steps=20, sigma0=1e3,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (kl_divergence(*model.encode(x_adv)) > kl_divergence(*model.encode(x)) + 1e-4).all()
        assert (elbo(model, x_adv, noise, sigma0=1e3) < elbo(model, x, noise, sigma0=1e3)).all()
