"""The certificate audit: does any attacked ELBO fall below the certified bound for the same noise?

One rule, used by every stage that compares a bound with an attack (`evaluate`, `certify`), and
the same comparison for the attack-strength gate:
- a bound is violated when the attacked ELBO lies below it by more than the float slack,
  ``tolerance * |bound|`` (none for a bound of +inf, which no finite ELBO satisfies);
- a bound of -inf is vacuous: it certifies nothing, so nothing can violate it (it is counted and
  reported as vacuous, never as a pass of a real certificate);
- NaN anywhere (bound or attacked ELBO) is a failure, never a pass: the comparison could not be
  made. ``value < floor`` is False for NaN, so every test here is written ``not value >= floor``.
This module imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def below(value, floor):
    """``value < floor``, except that NaN on either side counts as below (elementwise for arrays):
    a comparison that could not be made fails."""
    return ~(np.asarray(value) >= floor)


@dataclass(frozen=True)
class CertificateAudit:
    """The audit of one set of (bound, attacked ELBO) pairs; ``where`` names the model, eps and ball."""

    where: str
    pairs: int
    violations: int  # pairs that fail: the ELBO below a finite bound beyond the slack, or NaN on either side
    nan: int  # of which NaN
    vacuous: int  # bounds of -inf (and an ELBO that is not NaN): nothing certified, nothing to violate
    min_margin: float  # min of attacked ELBO - bound (NaN if any pair holds NaN)

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def describe(self) -> str:
        """One line for a failure message or a log."""
        parts = []
        if self.violations - self.nan:
            parts.append(f"{self.violations - self.nan} of {self.pairs} attacked ELBOs below the certified bound")
        if self.nan:
            parts.append(f"{self.nan} of {self.pairs} pairs with a NaN bound or attacked ELBO")
        if self.vacuous:
            parts.append(f"{self.vacuous} of {self.pairs} bounds vacuous (-inf)")
        return f"{self.where}: " + ("; ".join(parts) or f"{self.pairs} pairs sound")


def audit_certificate(bound, attacked_elbo, tolerance: float, where: str = "") -> CertificateAudit:
    """Audit per-pair certified bounds against the attacked ELBOs for the same noise (arrays of one shape).

    ``tolerance`` is relative to |bound| (float slack only). See the module's rule for -inf and NaN.
    """
    bound, attacked_elbo = np.asarray(bound), np.asarray(attacked_elbo)  # in their own precision (float32)
    if bound.shape != attacked_elbo.shape:
        raise ValueError(f"{where}: {bound.shape} bounds for {attacked_elbo.shape} attacked ELBOs")
    nan = np.isnan(bound) | np.isnan(attacked_elbo)
    vacuous = (bound == -np.inf) & ~nan
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, a failure unless the bound is vacuous
        margin = attacked_elbo - bound
        slack = np.where(np.isfinite(bound), tolerance * np.abs(bound), 0)  # none for a bound of +inf
        violated = (below(margin, -slack) & ~vacuous) | nan
    return CertificateAudit(where=where, pairs=int(bound.size), violations=int(violated.sum()), nan=int(nan.sum()),
                            vacuous=int(vacuous.sum()), min_margin=float(margin.min()) if margin.size else float("inf"))


def audit_failure(audits: list[CertificateAudit], what: str) -> str | None:
    """The message a stage exits with when any audit failed (None when all passed): ``what`` names
    the model, each failing audit its eps and ball, and why."""
    failed = [audit for audit in audits if not audit.passed]
    if not failed:
        return None
    nan = sum(audit.nan for audit in failed)
    cause = ("a NaN bound or attacked ELBO is not a certificate: the model, the bound or the attack "
             "produced NaN" if nan else "the bound or the attack is wrong")
    return (f"certificate audit FAILED for {what}: {cause}\n"
            + "\n".join(f"  {audit.describe()}" for audit in failed))


def vacuous_note(audits: list[CertificateAudit], what: str) -> str | None:
    """A line saying which bounds were vacuous (-inf), or None."""
    vacuous = [audit for audit in audits if audit.vacuous]
    if not vacuous:
        return None
    return (f"{what}: vacuous certificates (bound -inf) at "
            + ", ".join(f"{audit.where} ({audit.vacuous} of {audit.pairs})" for audit in vacuous))


# --- the attack-strength gate: the same rule for a challenger against the attack curve ---


def attack_tolerance(mean_elbo: float, tolerance_nats: float, tolerance_relative: float) -> float:
    """How far an attack may move a mean ELBO before it counts: max(tolerance_nats, tolerance_relative x |ELBO|)."""
    return max(tolerance_nats, tolerance_relative * abs(mean_elbo))


def challenger_beats_curve(mean_curve: float, mean_challenger: float, tolerance: float) -> bool:
    """The gate: the challenger's mean attacked ELBO lies below the curve's by more than ``tolerance``,
    or either is NaN (nothing was measured, so nothing passed)."""
    return bool(below(mean_challenger, mean_curve - tolerance))


def excusable_beats(beaten_challengers: list[str], budget_challengers: list[str], declared_upper_bound: bool) -> bool:
    """The rule for a curve that a challenger beats (README, "Attack"). It fails the attack-strength
    stage, except where params declare the model's curve an upper bound (its budget does not
    converge within the cap the attack_budget ladder measures) AND every challenger that beats it
    spends more of the curve's own attack (steps, starts, EOT draws). A different attack beating
    the curve (fixed-step PGD, the residual-sign corner, the latent attack) means the attack is
    wrong, not short of budget: that always fails."""
    return declared_upper_bound and all(name in budget_challengers for name in beaten_challengers)
