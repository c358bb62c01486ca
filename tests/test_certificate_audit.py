"""The certificate audit and the attack-strength gate refuse NaN: by hand on the functions, then
through the stages (evaluate, certify, attack_strength), which must exit non-zero naming the
model, the eps and the ball."""

import math

import numpy as np
import pandas as pd
import pytest
import yaml

import provae.evaluation
from provae.certificate_audit import (attack_tolerance, audit_certificate, audit_failure, below, excusable_beats,
                                      challenger_beats_curve, vacuous_note)
from provae.evaluation import audit_curve, curve_table

from stage_project import project, write_per_example  # noqa: F401  (a fixture)

NAN, INF = float("nan"), float("inf")


# --- the rule, by hand ---


def test_a_value_equal_to_its_floor_is_not_below():
    assert not below(5.0, 5.0) and below(np.nextafter(5.0, 0.0), 5.0)


def test_the_description_counts_each_kind_apart():
    audit = audit_certificate([-10.0, -10.0, -10.0, NAN, -INF, -INF], [-12.0, -11.0, -9.0, -9.0, -9.0, -9.0], 1e-4, "m")
    assert (audit.violations, audit.nan, audit.vacuous) == (3, 1, 2)
    assert audit.describe() == ("m: 2 of 6 attacked ELBOs below the certified bound; 1 of 6 pairs with a NaN bound "
                                "or attacked ELBO; 2 of 6 bounds vacuous (-inf)")
    assert audit_certificate([-10.0], [-9.0], 1e-4, "m").describe() == "m: 1 pairs sound"


def test_mismatched_shapes_are_named():
    with pytest.raises(ValueError, match=r"^m: \(3,\) bounds for \(2,\) attacked ELBOs$"):
        audit_certificate(np.zeros(3), np.zeros(2), 1e-4, "m")
    assert audit_certificate([-1.0], [0.0], 1e-4).where == ""


def test_no_pairs_pass_with_an_infinite_margin():
    audit = audit_certificate([], [], 1e-4, "m")
    assert audit.passed and audit.pairs == 0 and audit.min_margin == INF


def test_vacuous_pairs_raise_no_numpy_warning():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        audit = audit_certificate(np.array([-INF, -INF], np.float32), np.array([-INF, -5.0], np.float32), 1e-4, "m")
    assert audit.vacuous == 2 and audit.passed


def test_the_failure_message_says_why_and_lists_each_failed_audit():
    unsound = audit_certificate([-10.0], [-12.0], 1e-4, "eps 0.1, unclipped")
    with_nan = audit_certificate([NAN], [-12.0], 1e-4, "eps 0.2, clipped")
    sound = audit_certificate([-10.0], [-9.0], 1e-4, "eps 0.05, unclipped")
    assert audit_failure([unsound, sound], "mnist-eps0.0-seed0") == (
        "certificate audit FAILED for mnist-eps0.0-seed0: the bound or the attack is wrong\n"
        "  eps 0.1, unclipped: 1 of 1 attacked ELBOs below the certified bound")
    assert audit_failure([unsound, with_nan], "m") == (
        "certificate audit FAILED for m: a NaN bound or attacked ELBO is not a certificate: the model, the bound or "
        "the attack produced NaN\n"
        "  eps 0.1, unclipped: 1 of 1 attacked ELBOs below the certified bound\n"
        "  eps 0.2, clipped: 1 of 1 pairs with a NaN bound or attacked ELBO")


def test_the_vacuous_note_lists_each_audit():
    a = audit_certificate([-INF, -1.0], [-5.0, 0.0], 1e-4, "eps 0.15")
    b = audit_certificate([-INF], [-5.0], 1e-4, "eps 0.2")
    assert vacuous_note([a, b], "m") == "m: vacuous certificates (bound -inf) at eps 0.15 (1 of 2), eps 0.2 (1 of 1)"


def test_a_sound_bound_passes_and_float_slack_is_allowed():
    audit = audit_certificate([-10.0, -20.0], [-9.0, -20.0 - 1e-5], tolerance=1e-4, where="x")
    assert audit.passed and audit.violations == audit.nan == audit.vacuous == 0 and audit.pairs == 2
    assert audit.min_margin == pytest.approx(-1e-5)


def test_an_attacked_elbo_below_the_bound_is_a_violation():
    audit = audit_certificate([-10.0, -20.0, -30.0], [-11.0, -19.0, -30.01], tolerance=1e-4, where="unclipped ball, eps_attack 0.1")
    assert not audit.passed and audit.violations == 2 and audit.nan == 0
    assert audit.describe() == "unclipped ball, eps_attack 0.1: 2 of 3 attacked ELBOs below the certified bound"


@pytest.mark.parametrize("bound, attacked", [([NAN, -5.0], [-4.0, -4.0]), ([-5.0, -5.0], [NAN, -4.0]),
                                             ([NAN, -5.0], [NAN, -4.0]), ([-INF, -5.0], [NAN, -4.0])])
def test_nan_in_the_bound_or_the_attacked_elbo_fails(bound, attacked):
    audit = audit_certificate(bound, attacked, tolerance=1e-4, where="clipped ball, eps_attack 0.05")
    assert not audit.passed and audit.violations == 1 and audit.nan == 1 and audit.vacuous == 0
    assert "1 of 2 pairs with a NaN bound or attacked ELBO" in audit.describe()
    message = audit_failure([audit], "MNIST eps_train=0 seed=0")
    assert message.startswith("certificate audit FAILED for MNIST eps_train=0 seed=0: a NaN bound")
    assert "clipped ball, eps_attack 0.05" in message


def test_a_bound_of_minus_infinity_is_vacuous_not_violated():
    audit = audit_certificate([-INF, -INF, -5.0], [-3.0, -INF, -4.0], tolerance=1e-4, where="unclipped ball, eps_attack 0.2")
    assert audit.passed and audit.vacuous == 2 and audit.violations == 0
    assert audit_failure([audit], "m") is None
    assert vacuous_note([audit], "m") == "m: vacuous certificates (bound -inf) at unclipped ball, eps_attack 0.2 (2 of 3)"


@pytest.mark.parametrize("bound, attacked", [(-5.0, -INF), (INF, INF), (INF, 3.0)])
def test_infinite_values_against_a_real_bound_fail(bound, attacked):
    assert audit_certificate([bound], [attacked], tolerance=1e-4).violations == 1


def test_the_audit_keeps_float32_arithmetic():
    """The curve's values are float32: the margins (written to the curve's csv) are computed in float32 too."""
    bound, attacked = np.array([-100.1], np.float32), np.array([-100.0], np.float32)
    assert audit_certificate(bound, attacked, 1e-4).min_margin == float(attacked[0] - bound[0])


def test_below_counts_nan_as_below():
    assert below(1.0, 2.0) and not below(2.0, 1.0) and below(NAN, 1.0) and below(1.0, NAN)
    assert below(np.array([1.0, 3.0, NAN]), 2.0).tolist() == [True, False, True]


def test_the_attack_strength_gate():
    tolerance = attack_tolerance(-100.0, 0.5, 0.01)
    assert tolerance == 1.0 and attack_tolerance(-10.0, 0.5, 0.01) == 0.5
    assert not challenger_beats_curve(-100.0, -100.9, tolerance)  # within the tolerance
    assert not challenger_beats_curve(-100.0, -90.0, tolerance)  # weaker than the curve
    assert challenger_beats_curve(-100.0, -101.5, tolerance)  # beaten
    assert challenger_beats_curve(-100.0, NAN, tolerance) and challenger_beats_curve(NAN, -100.0, tolerance)
    assert challenger_beats_curve(NAN, -100.0, attack_tolerance(NAN, 0.5, 0.01))


# --- evaluate's audit: its curve table counts what the audit counts ---


def curve_arrays(bound: float, attacked_same_noise: float) -> dict:
    """Arrays as `attack_curve` returns them, two eps_attack x three images; only eps 0.1 is off."""
    bound_row = np.array([[-10.0] * 3, [-12.0, -12.0, bound]], np.float32)
    attacked_row = np.array([[-10.0] * 3, [-11.0, -11.0, attacked_same_noise]], np.float32)
    return {"elbo_clean": np.full((2, 3), -10.0, np.float32), "elbo_attacked": attacked_row, "bound": bound_row,
            "elbo_attacked_same_noise": attacked_row, "winner": np.zeros((2, 3), np.int64)}


@pytest.mark.parametrize("bound, attacked, nan", [(-12.0, -11.0, 0), (-5.0, -11.0, 0), (NAN, -11.0, 1), (-12.0, NAN, 1)])
def test_evaluate_audit_fails_on_an_unsound_bound_and_on_nan(bound, attacked, nan):
    arrays = curve_arrays(bound, attacked)
    audits = audit_curve(arrays, [0.0, 0.1], 1e-4, "clipped")
    table = curve_table(arrays, [0.0, 0.1], ["none"], audits, "clipped")
    sound = bound == -12.0 and attacked == -11.0
    assert table["violations_clipped"].tolist() == [0, 0 if sound else 1]
    assert [audit.nan for audit in audits] == [0, nan]
    message = audit_failure(audits, "Blobs eps_train=0.05 seed=0")
    assert (message is None) == sound
    if not sound:
        assert "Blobs eps_train=0.05 seed=0" in message and "clipped ball, eps_attack 0.1: " in message


# --- the stages ---


def test_evaluate_stage_passes_on_a_sound_model(project, monkeypatch):
    assert project.run("evaluate", monkeypatch) is None
    assert pd.read_csv(project.curve)[["violations_unclipped", "violations_clipped"]].eq(0).all().all()


@pytest.mark.parametrize("bound", ["unsound", "nan"])
def test_evaluate_stage_fails_on_an_unsound_or_nan_bound(bound, project, monkeypatch):
    real = provae.evaluation.elbo_lower_bound

    def broken(model, x, eps, noise, sigma0, clip):
        value = real(model, x, eps, noise, sigma0, clip)
        return value + 1e6 if bound == "unsound" else value * math.nan

    monkeypatch.setattr(provae.evaluation, "elbo_lower_bound", broken)
    message = project.run("evaluate", monkeypatch)
    assert message is not None and message.startswith("certificate audit FAILED for Blobs eps_train=0.05 seed=0")
    assert ("NaN" in message) == (bound == "nan")
    for ball in ("unclipped", "clipped"):
        assert f"{ball} ball, eps_attack 0.05: " in message and f"{ball} ball, eps_attack 0.1: " in message
    curve = pd.read_csv(project.curve)  # written before the stage failed, for a look
    assert (curve.set_index("eps_attack").loc[[0.05, 0.1], "violations_unclipped"] > 0).all()


@pytest.mark.parametrize("attacked, expected", [(-1.0e6, "attacked ELBOs below the certified bound"),
                                                 (NAN, "pairs with a NaN bound or attacked ELBO")])
def test_certify_stage_fails_on_an_attack_below_its_bound_and_on_nan(attacked, expected, project, monkeypatch):
    write_per_example(project, bound=-50.0, attacked_same_noise=attacked)
    message = project.run("certify", monkeypatch)
    assert message is not None and message.startswith("certificate audit FAILED for Blobs eps_train=0.05 seed=0")
    assert f"unclipped ball, eps_attack 0.1, ibp: 4 of 4 {expected}" in message
    assert pd.read_csv(project.bounds)["violations"].eq(4).all()


def test_certify_stage_passes_when_the_attacks_stay_above(project, monkeypatch):
    write_per_example(project, bound=-50.0, attacked_same_noise=1.0e6)
    assert project.run("certify", monkeypatch) is None
    assert pd.read_csv(project.bounds)["violations"].eq(0).all()


@pytest.mark.parametrize("curve, beaten", [(1.0e6, True), (NAN, True), (-1.0e6, False)])
def test_attack_strength_stage_gate(curve, beaten, project, monkeypatch):
    """A curve far above any attack is beaten; a NaN curve fails too; a curve far below passes."""
    write_per_example(project, bound=-50.0, attacked_same_noise=-50.0, attacked=curve)
    message = project.run("attack_strength", monkeypatch)
    table = pd.read_csv(project.strength)
    assert table["beats_curve"].all() == beaten
    if beaten:
        assert message is not None and "a challenger beat the attack curve" in message
        assert ("NaN" in message) == math.isnan(curve)
    else:
        assert message is None


@pytest.mark.parametrize("challenger, passes", [("apgd_4x_steps", True), ("residual_sign", False)])
def test_a_declared_upper_bound_excuses_a_bigger_budget_only(challenger, passes, project, monkeypatch):
    """The rule of README "Attack": a model declared an upper bound passes when only more of the
    curve's own attack beats it (the report marks the curve); another attack beating it fails."""
    settings = {"apgd_4x_steps": {"apgd_steps": 4}, "residual_sign": {"method": "residual_sign"}}
    params = yaml.safe_load((project.folder / "params.yaml").read_text())
    params["attack_strength"].update(challengers={challenger: settings[challenger]},
                                     upper_bound_models=["blobs-0.05-0"])
    (project.folder / "params.yaml").write_text(yaml.safe_dump(params))
    write_per_example(project, bound=-50.0, attacked_same_noise=-50.0, attacked=1.0e6)
    message = project.run("attack_strength", monkeypatch)
    assert pd.read_csv(project.strength)["beats_curve"].all()
    assert (message is None) == passes
    if not passes:
        assert "a challenger beat the attack curve" in message


def test_excusable_beats_never_excuses_an_undeclared_model_or_another_attack():
    budget = ["apgd_4x_steps", "apgd_2x_eot"]
    assert excusable_beats(["apgd_4x_steps", "apgd_2x_eot"], budget, declared_upper_bound=True)
    assert not excusable_beats(["apgd_4x_steps"], budget, declared_upper_bound=False)
    assert not excusable_beats(["apgd_4x_steps", "latent_alone"], budget, declared_upper_bound=True)
