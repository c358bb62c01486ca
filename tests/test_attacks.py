import pytest
import torch

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


@pytest.mark.parametrize("name", list(ATTACKS))
@pytest.mark.parametrize("clip", [True, False])
def test_attacks_take_one_eps_per_example(name, clip):
    model, x = small_model(), synthetic_images(6)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((6, model.latent_dim), generator=g)
    eps = torch.tensor([0.0, 0.05, 0.1, 0.2, 0.3, 0.5])
    attack = ATTACKS[name]
    if not clip:
        attack = {
            "pgd": lambda m, x, eps, n, g: pgd_attack(m, x, eps, n, steps=15, restarts=2, clip=False, generator=g),
            "pgd_eot": lambda m, x, eps, n, g: pgd_attack(m, x, eps, n, steps=5, eot_samples=3, clip=False, generator=g),
            "latent_kl": lambda m, x, eps, n, g: latent_attack(m, x, eps, n, objective="kl", steps=10, clip=False,
                                                               generator=g),
            "latent_mu": lambda m, x, eps, n, g: latent_attack(m, x, eps, n, objective="mu_shift", steps=10,
                                                               clip=False, generator=g),
        }[name]
    x_adv = attack(model, x, eps, noise, g)
    box = input_box(x, eps, clip)
    assert ((x_adv >= box.lower) & (x_adv <= box.upper)).all()
    assert torch.equal(x_adv[0], x[0])
    if name.startswith("pgd"):  # the latent attacks need not lower this ELBO (they are scored by it)
        assert not torch.equal(x_adv[1:], x[1:])
    with torch.no_grad():
        assert (elbo(model, x_adv, noise) <= elbo(model, x, noise) + 1e-5).all()


def test_a_per_example_eps_is_the_same_attack_as_each_eps_alone():
    """Fixed-noise PGD from the clean input is deterministic: batching radii changes nothing."""
    model, x = small_model(), synthetic_images(4)
    noise = torch.randn(4, model.latent_dim, generator=torch.Generator().manual_seed(0))
    radii = [0.05, 0.1, 0.2, 0.3]
    batched = pgd_attack(model, x, torch.tensor(radii), noise, steps=8, random_start=False)
    for i, eps in enumerate(radii):
        alone = pgd_attack(model, x[i : i + 1], eps, noise[i : i + 1], steps=8, random_start=False)
        torch.testing.assert_close(batched[i : i + 1], alone)


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

    # Every candidate is scored with the same fresh draws, from the caller's generator.
    fresh = torch.stack([expected_elbo(model, c, 4, generator=torch.Generator().manual_seed(1)) for c in candidates])
    with torch.no_grad():
        same = torch.stack([elbo(model, c, noise) for c in candidates])
    torch.testing.assert_close(result.candidate_elbos, fresh)
    torch.testing.assert_close(result.elbo, fresh.min(0).values)
    torch.testing.assert_close(result.attack_index, fresh.argmin(0))
    torch.testing.assert_close(result.x_adv, torch.stack(candidates)[fresh.argmin(0), torch.arange(6)])
    torch.testing.assert_close(result.elbo_same_noise, same.min(0).values)


def test_worst_of_scores_with_the_draws_it_is_given():
    model, x = small_model(), synthetic_images(5)
    noise = torch.randn((5, model.latent_dim), generator=torch.Generator().manual_seed(0))
    draws = torch.randn((3, 5, model.latent_dim), generator=torch.Generator().manual_seed(1))
    candidates = [x, pgd_attack(model, x, 0.2, noise, steps=5, generator=torch.Generator().manual_seed(2))]
    result = worst_of(model, candidates, noise, score_noise=draws)
    with torch.no_grad():
        by_hand = torch.stack([torch.stack([elbo(model, c, d) for d in draws]).mean(0) for c in candidates])
    torch.testing.assert_close(result.candidate_elbos, by_hand)
    # A subset of the examples with the matching subset of draws scores them the same: other runs
    # (attack_strength, make audit) compare attacks on common random numbers.
    subset = worst_of(model, [c[:2] for c in candidates], noise[:2], score_noise=draws[:, :2])
    torch.testing.assert_close(subset.candidate_elbos, by_hand[:, :2])


def test_latent_attack_raises_the_kl_when_the_elbo_is_all_kl():
    """With a huge sigma0 the reconstruction term vanishes, ELBO ~ -KL: the KL attack must win."""
    model, x = small_model(), synthetic_images(8)
    noise = torch.randn(8, model.latent_dim)
    x_adv = latent_attack(model, x, 0.1, noise, objective="kl", steps=20, sigma0=1e3,
                          generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (kl_divergence(*model.encode(x_adv)) > kl_divergence(*model.encode(x)) + 1e-4).all()
        assert (elbo(model, x_adv, noise, sigma0=1e3) < elbo(model, x, noise, sigma0=1e3)).all()
