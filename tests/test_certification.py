"""The certification protocol (provae/certification.py) that the certify and certify_elbo stages share,
on a small untrained VAE (8x8 images, 4 latents): the rows it writes (one per ball, eps_attack and
method; one radius per image, method and tau), the audit against `evaluate`'s attacked ELBOs for the
same noise (an attack below a bound fails exactly that eps, ball and method), each certified radius a
point it checked where the bound really holds (recomputed here) and whose next checked point fails,
the methods' order (elbo >= crown >= ibp, per image), and the errors it raises."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from provae.bounds import elbo, elbo_lower_bound, input_box
from provae.certificate_audit import audit_failure
from provae.certification import (METHODS, batched, bound_method, certified_radius, certify_model, first_attacked,
                                   tau_floors)
from provae.elbo_relaxation import elbo_relaxation_lower_bound
from provae.evaluation import BALLS
from provae.linear_bounds import crown_elbo_lower_bound

from conftest import small_model, synthetic_images

SIGMA0 = 2**-0.5
N = 4            # images certified
EXTRA = 2        # `evaluate` attacked more images than certify certifies: their columns must not be read
EPS = [0.0, 0.02, 0.05, 0.1, 0.2]
TOLERANCE = 1e-4  # evaluate.audit_tolerance
P = {"methods": ["ibp", "crown"], "intermediate": "crown", "tau_nats": [0.5, 2.0, 1e6], "tau_relative": [0.1],
     "bisection_steps": 3, "batch_size": 3}  # batch 3 of 4 images: one full batch, one partial
TAUS = ["0.5 nats", "2 nats", "1e+06 nats", "10% of |ELBO|"]
BOUND_COLUMNS = ["ball", "eps_attack", "method", "bound", "attacked_elbo", "gap", "violations", "seconds_per_image"]
RADIUS_COLUMNS = ["image", "method", "tau", "ball", "radius"]


@pytest.fixture(scope="module")
def setting():
    model = small_model()
    x = synthetic_images(N, seed=1)
    noise = torch.randn((N, model.latent_dim), generator=torch.Generator().manual_seed(7))
    return model, x, noise


def honest_attacks(model, x, noise, eps_grid=EPS, seed=0) -> dict:
    """`evaluate`'s per_example arrays as an honest attack would leave them: the ELBO, for the same
    noise, at a random point of each ball (never below a sound bound); NaN in the extra columns."""
    g = torch.Generator().manual_seed(seed)
    arrays = {"eps_attack": np.array(eps_grid)}
    for ball, clip in BALLS.items():
        rows = []
        for eps in eps_grid:
            box = input_box(x, eps, clip)
            point = box.lower + torch.rand(x.shape, generator=g) * (box.upper - box.lower)
            with torch.no_grad():
                values = elbo(model, point, noise, SIGMA0).numpy()
            rows.append(np.concatenate([values, np.full(EXTRA, np.nan, np.float32)]))
        arrays[f"{ball}/elbo_attacked_same_noise"] = np.stack(rows)
        arrays[f"{ball}/elbo_attacked"] = arrays[f"{ball}/elbo_attacked_same_noise"]
    return arrays


def certify(setting, attacked, p=P, balls=("unclipped", "clipped"), headline="unclipped", eps_grid=EPS):
    model, x, noise = setting
    return certify_model(model, x, noise, attacked, list(eps_grid), p, list(balls), headline, SIGMA0, TOLERANCE)


def bound_values(setting, method, eps, clip, intermediate="crown") -> torch.Tensor:
    model, x, noise = setting
    return batched(bound_method(method, intermediate), model, x, eps, noise, SIGMA0, clip, N)


@pytest.fixture(scope="module")
def honest(setting):
    attacked = honest_attacks(*setting)
    return attacked, certify(setting, attacked)


# --- the rows ---


def test_one_bounds_row_per_ball_eps_and_method_with_the_documented_columns(honest):
    _, found = honest
    bounds = pd.DataFrame(found.bounds)
    assert list(bounds.columns) == BOUND_COLUMNS
    keys = list(zip(bounds["ball"], bounds["eps_attack"], bounds["method"]))
    assert len(keys) == len(set(keys)) == 2 * len(EPS) * len(P["methods"])
    assert set(keys) == {(b, e, m) for b in BALLS for e in EPS for m in P["methods"]}
    assert (bounds["seconds_per_image"] > 0).all() and np.isfinite(bounds["seconds_per_image"]).all()


def test_each_bounds_row_is_the_mean_over_the_images_of_its_bound_and_attack(setting, honest):
    """bound, attacked_elbo and gap are means over the N certified images (never the extra attacked
    columns, which hold NaN), the bound recomputed here for that ball, eps and method."""
    attacked, found = honest
    for row in found.bounds:
        i = EPS.index(row["eps_attack"])
        bound = bound_values(setting, row["method"], row["eps_attack"], BALLS[row["ball"]]).numpy()
        attack = attacked[f"{row['ball']}/elbo_attacked_same_noise"][i, :N]
        assert row["bound"] == pytest.approx(bound.mean(), rel=1e-5), row
        assert row["attacked_elbo"] == pytest.approx(attack.mean(), rel=1e-6), row
        assert row["gap"] == pytest.approx((attack - bound).mean(), rel=1e-4, abs=1e-5), row


def test_bounds_fall_with_eps_and_the_clipped_ball_is_tighter(honest):
    """A check on which ball each row was computed in: at eps > 0 the clipped ball (a subset) is
    certified higher than the unclipped one on these images, which have saturated pixels."""
    table = pd.DataFrame(honest[1].bounds).set_index(["ball", "eps_attack", "method"])["bound"]
    for method in P["methods"]:
        for eps in EPS[1:]:
            assert table[("clipped", eps, method)] > table[("unclipped", eps, method)] + 0.1
        for ball in BALLS:
            assert list(table[ball, :, method].diff().dropna() < 0) == [True] * (len(EPS) - 1)


def test_at_eps_zero_every_bound_is_the_elbo(setting, honest):
    model, x, noise = setting
    with torch.no_grad():
        clean = elbo(model, x, noise, SIGMA0).mean().item()
    rows = [row for row in honest[1].bounds if row["eps_attack"] == 0.0]
    assert len(rows) == 2 * len(P["methods"])
    for row in rows:
        assert row["bound"] == pytest.approx(clean, rel=1e-5), row
        assert row["attacked_elbo"] == pytest.approx(clean, rel=1e-5), row  # the ball of radius 0 is the image


def test_one_radius_per_image_method_and_tau_in_the_headline_ball(honest):
    radii = pd.DataFrame(honest[1].radii)
    assert list(radii.columns) == RADIUS_COLUMNS
    assert len(radii) == N * len(P["methods"]) * len(TAUS)
    keys = set(zip(radii["image"], radii["method"], radii["tau"]))
    assert keys == {(j, m, t) for j in range(N) for m in P["methods"] for t in TAUS}
    assert set(radii["ball"]) == {"unclipped"}
    assert ((radii["radius"] >= 0) & (radii["radius"] <= max(EPS) + 1e-7)).all()  # (float32 radii)
    # a tau no bound on the grid falls short of: every image certified at the largest eps_attack
    assert radii.loc[radii["tau"] == "1e+06 nats", "radius"].to_numpy() == pytest.approx([max(EPS)] * 2 * N)
    # the smaller tau certifies no more than the larger one
    small = radii[radii["tau"] == "0.5 nats"].set_index(["image", "method"])["radius"]
    large = radii[radii["tau"] == "2 nats"].set_index(["image", "method"])["radius"]
    assert (small <= large).all() and (small < large).any()


# --- the audit ---


def test_honest_attacks_pass_every_audit(honest):
    _, found = honest
    assert len(found.audits) == len(found.bounds)
    assert all(audit.passed and audit.pairs == N for audit in found.audits)
    assert all(row["violations"] == 0 for row in found.bounds)
    assert audit_failure(found.audits, "model") is None


def test_an_attack_below_one_methods_bound_fails_that_eps_ball_and_method_only(setting):
    """An attacked ELBO between IBP's and CROWN's bound, at one image, eps and ball: CROWN's audit
    there fails (its certificate is contradicted), IBP's does not, nor any other."""
    attacked = honest_attacks(*setting)
    ibp = bound_values(setting, "ibp", 0.05, False)[1].item()
    crown = bound_values(setting, "crown", 0.05, False)[1].item()
    assert crown > ibp + 0.5
    attacked["unclipped/elbo_attacked_same_noise"][EPS.index(0.05), 1] = (ibp + crown) / 2
    found = certify(setting, attacked)
    failed = [audit for audit in found.audits if not audit.passed]
    assert [(a.where, a.violations, a.nan) for a in failed] == [("unclipped ball, eps_attack 0.05, crown", 1, 0)]
    assert [(r["ball"], r["eps_attack"], r["method"]) for r in found.bounds if r["violations"]] == [
        ("unclipped", 0.05, "crown")]
    message = audit_failure(found.audits, "blobs eps 0.05")
    assert "blobs eps 0.05" in message and "unclipped ball, eps_attack 0.05, crown" in message
    assert "ibp" not in message


def test_an_attack_below_every_bound_in_the_clipped_ball_fails_each_method_there(setting):
    attacked = honest_attacks(*setting)
    attacked["clipped/elbo_attacked_same_noise"][EPS.index(0.2), 3] = -1e4
    found = certify(setting, attacked)
    assert sorted(a.where for a in found.audits if not a.passed) == [
        "clipped ball, eps_attack 0.2, crown", "clipped ball, eps_attack 0.2, ibp"]


def test_a_nan_attack_fails_its_audit(setting):
    attacked = honest_attacks(*setting)
    attacked["unclipped/elbo_attacked_same_noise"][EPS.index(0.02), 0] = np.nan
    found = certify(setting, attacked)
    failed = [(a.where, a.nan) for a in found.audits if not a.passed]
    assert failed == [("unclipped ball, eps_attack 0.02, ibp", 1), ("unclipped ball, eps_attack 0.02, crown", 1)]


# --- the certified radius ---


def checked_points(eps_grid, steps) -> np.ndarray:
    """The grid, and every point bisection can reach between two of its neighbours."""
    points = set(eps_grid)
    for a, b in zip(eps_grid, eps_grid[1:]):
        points |= {a + k * (b - a) / 2**steps for k in range(1, 2**steps)}
    return np.array(sorted(points))


@pytest.mark.parametrize("balls, headline", [(["unclipped", "clipped"], "unclipped"),
                                            (["clipped", "unclipped"], "clipped")])
def test_each_radius_is_a_checked_point_where_the_bound_holds_and_the_next_one_fails(setting, balls, headline):
    """Recomputed here: the bound at the radius is >= ELBO - tau; every eps_attack above it fails,
    and so does the next point bisection would check (where it stopped); the headline ball's clip
    throughout, which comes first in ``balls`` (the other ball is the last one certified)."""
    model, x, noise = setting
    found = certify(setting, honest_attacks(*setting), balls=balls, headline=headline)
    radii = pd.DataFrame(found.radii)
    assert set(radii["ball"]) == {headline}
    clip, steps = BALLS[headline], P["bisection_steps"]
    points = checked_points(EPS, steps)
    with torch.no_grad():
        clean = elbo(model, x, noise, SIGMA0)
    floors = dict(tau_floors(clean, P["tau_nats"], P["tau_relative"]))
    interior = 0
    for (method, tau), part in radii.groupby(["method", "tau"]):
        radius = part.sort_values("image")["radius"].to_numpy()
        assert np.isclose(radius[:, None], points[None, :], rtol=0, atol=1e-6).any(1).all(), (method, tau, radius)
        floor = floors[tau].numpy()
        slack = 1e-5 * np.abs(floor)
        at = bound_values(setting, method, torch.tensor(radius, dtype=torch.float32), clip).numpy()
        assert (at >= floor - slack).all(), (method, tau, radius, at, floor)
        for eps in EPS:
            above = radius < eps - 1e-7
            assert (bound_values(setting, method, eps, clip).numpy()[above] < floor[above] + slack[above]).all()
        grid = np.array(EPS)
        open_ = radius < grid[-1] - 1e-7
        cell = np.searchsorted(grid, radius + 1e-7, side="right") - 1  # the grid interval the radius lies in
        width = grid[np.minimum(cell + 1, len(grid) - 1)] - grid[cell]
        following = torch.tensor(np.where(open_, radius + width / 2**steps, radius), dtype=torch.float32)
        after = bound_values(setting, method, following, clip).numpy()
        assert (after[open_] < floor[open_] + slack[open_]).all(), (method, tau, radius, after, floor)
        interior += int((open_ & ~np.isclose(radius[:, None], grid[None, :], atol=1e-6).any(1)).sum())
    assert interior >= 4  # bisection found radii between grid points: the test saw it work


def test_certified_radius_by_hand_on_a_made_up_bound():
    """A bound that is 0 up to eps 0.3 and -1 beyond, on a grid 0, 0.2, 0.4: the floor -0.5 holds at
    0.2, fails at 0.4; three bisections check 0.3 (holds), 0.35, 0.325 (fail): 0.3. An image whose
    bound holds at the largest eps is certified there; one that fails at every eps > 0, at 0.
    The bound is not monotone on the grid for the last image: the largest eps_attack where it
    holds counts, then bisection towards the next one."""
    limits = torch.tensor([0.3, 1.0, 0.0, 0.1])  # per image: the bound is 0 up to its limit

    def bound(model, x, eps, noise, sigma0, clip):
        eps = eps if isinstance(eps, torch.Tensor) else torch.full((x.shape[0],), eps)
        return torch.where(eps <= noise[:, 0] + 1e-9, 0.0, -1.0)

    grid = [0.0, 0.2, 0.4]
    noise = limits[:, None]
    grid_bounds = torch.stack([bound(None, torch.zeros(4, 1), e, noise, 1.0, False) for e in grid])
    grid_bounds[2, 3] = 0.0  # image 3 holds again at 0.4 (not monotone): certified there
    radius = certified_radius(bound, None, torch.zeros(4, 1), noise, torch.full((4,), -0.5), grid, grid_bounds,
                              steps=3, sigma0=1.0, clip=False, batch_size=3)
    torch.testing.assert_close(radius, torch.tensor([0.3, 0.4, 0.0, 0.4]))
    one = certified_radius(bound, None, torch.zeros(4, 1), noise, torch.full((4,), -0.5), grid, grid_bounds,
                           steps=1, sigma0=1.0, clip=False, batch_size=3)
    torch.testing.assert_close(one, torch.tensor([0.3, 0.4, 0.0, 0.4]))
    none = certified_radius(bound, None, torch.zeros(4, 1), noise, torch.full((4,), -0.5), grid, grid_bounds,
                            steps=0, sigma0=1.0, clip=False, batch_size=3)
    torch.testing.assert_close(none, torch.tensor([0.2, 0.4, 0.0, 0.4]))


def test_tau_floors_in_nats_then_relative_to_the_magnitude():
    clean = torch.tensor([-100.0, 50.0])
    floors = tau_floors(clean, [5.0, 20.0], [0.1])
    assert [label for label, _ in floors] == ["5 nats", "20 nats", "10% of |ELBO|"]
    torch.testing.assert_close(floors[0][1], torch.tensor([-105.0, 45.0]))
    torch.testing.assert_close(floors[1][1], torch.tensor([-120.0, 30.0]))
    torch.testing.assert_close(floors[2][1], torch.tensor([-110.0, 45.0]))


# --- the methods ---


@pytest.fixture(scope="module")
def every_method(setting):
    """All three methods, on the headline ball alone (as certify_elbo runs them)."""
    p = {**P, "methods": list(METHODS), "tau_nats": [2.0], "tau_relative": [], "bisection_steps": 1}
    grid = [0.0, 0.05, 0.2]
    found = certify(setting, honest_attacks(*setting, eps_grid=grid), p=p, balls=["unclipped"], eps_grid=grid)
    return found, grid


def test_every_method_certifies_soundly_on_the_headline_ball_alone(every_method):
    found, grid = every_method
    bounds = pd.DataFrame(found.bounds)
    assert set(bounds["ball"]) == {"unclipped"} and len(bounds) == len(grid) * len(METHODS)
    assert list(dict.fromkeys(bounds["method"])) == list(METHODS)
    assert all(audit.passed for audit in found.audits)
    assert len(found.radii) == N * len(METHODS) * 1


def test_methods_are_ordered_elbo_crown_ibp_per_image(setting, every_method):
    """On the same noise: the ELBO relaxation (which takes the max with the box-wise bounds) is never
    below CROWN's bound, nor CROWN's below IBP's, per image and eps; and each is strictly tighter
    somewhere, so no method is another under its name. The radii keep that order per image."""
    found, grid = every_method
    table = pd.DataFrame(found.bounds).set_index(["eps_attack", "method"])["bound"]
    for eps in grid:
        values = {m: bound_values(setting, m, eps, False) for m in METHODS}
        assert (values["elbo"] >= values["crown"]).all() and (values["crown"] >= values["ibp"]).all()
        assert table[(eps, "elbo")] >= table[(eps, "crown")] >= table[(eps, "ibp")]
    assert table[(0.2, "elbo")] > table[(0.2, "crown")] + 0.5 and table[(0.2, "crown")] > table[(0.2, "ibp")] + 1.0
    radii = pd.DataFrame(found.radii).set_index(["tau", "image", "method"])["radius"].unstack("method")
    assert (radii["elbo"] >= radii["crown"]).all() and (radii["crown"] >= radii["ibp"]).all()
    assert (radii["crown"] > radii["ibp"]).any()


def test_each_method_is_its_bound_with_the_intermediate_bounds_asked_for(setting):
    model, x, noise = setting
    with torch.no_grad():
        assert torch.equal(bound_method("ibp", "crown")(model, x, 0.05, noise, SIGMA0, True),
                           elbo_lower_bound(model, x, 0.05, noise, SIGMA0, True))
        for intermediate in ("crown", "ibp"):
            assert torch.equal(bound_method("crown", intermediate)(model, x, 0.05, noise, SIGMA0, True),
                               crown_elbo_lower_bound(model, x, 0.05, noise, SIGMA0, True, intermediate=intermediate))
        ibp_boxes = bound_method("elbo", "ibp")(model, x, 0.1, noise, SIGMA0, False)
        assert torch.equal(ibp_boxes, elbo_relaxation_lower_bound(model, x, 0.1, noise, SIGMA0, False,
                                                                  decoder_boxes="input", slope_steps=80,
                                                                  intermediate="ibp"))
        assert not torch.equal(bound_method("crown", "ibp")(model, x, 0.2, noise, SIGMA0, False),
                               bound_method("crown", "crown")(model, x, 0.2, noise, SIGMA0, False))


def test_batched_splits_images_and_their_radii_alike(setting):
    """One eps per image, in batches of 3 of 4 images: each image's bound at its own eps."""
    model, x, noise = setting
    eps = torch.tensor([0.0, 0.02, 0.1, 0.2])
    together = batched(bound_method("crown", "crown"), model, x, eps, noise, SIGMA0, False, 3)
    for i in range(N):
        alone = bound_method("crown", "crown")(model, x[i : i + 1], float(eps[i]), noise[i : i + 1], SIGMA0, False)
        torch.testing.assert_close(together[i : i + 1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched(bound_method("ibp", "crown"), model, x, 0.05, noise, SIGMA0, True, 1),
                               bound_values(setting, "ibp", 0.05, True), rtol=1e-6, atol=1e-6)


# --- errors ---


def test_an_unknown_method_raises_naming_it(setting, honest):
    with pytest.raises(ValueError, match="'alpha-crown'"):
        bound_method("alpha-crown", "crown")
    with pytest.raises(ValueError, match="'bogus'"):
        certify(setting, honest[0], p={**P, "methods": ["ibp", "bogus"]})


@pytest.mark.parametrize("balls, headline, named", [
    (["clipped"], "unclipped", r"headline ball 'unclipped'"),  # the headline ball not among those certified
    ([], "clipped", r"headline ball 'clipped'"),
    (["unclipped", "l2"], "unclipped", r"balls \['unclipped', 'l2'\]"),  # a ball that is not one
    (["unclipped", "clipped"], "l_inf", r"headline ball 'l_inf'"),
])
def test_balls_without_the_headline_or_an_unknown_ball_raise_naming_it(setting, honest, balls, headline, named):
    with pytest.raises(ValueError, match=named):
        certify(setting, honest[0], balls=balls, headline=headline)


def test_first_attacked_is_the_examples_or_fewer_if_evaluate_attacked_fewer():
    attacked = {"unclipped/elbo_attacked": np.zeros((3, 16))}
    assert first_attacked(attacked, 64) == 16
    assert first_attacked(attacked, 4) == 4
    assert isinstance(first_attacked(attacked, 4), int)
