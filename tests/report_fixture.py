"""A small report grid for the report package's tests: MNIST's VAE and eps_train 0.1, seeds 0 and 1,
built from the committed seed-0 outputs (seed 1: the same files, every ELBO lowered by a constant,
so the spread over seeds is not zero). Checkpoints are stand-in bytes: the report only hashes them.
Written by hand here: the VAE's (seed 0) attack-budget ladder (`LADDER`), whose verdicts can be worked
out from the numbers below; and, on request, an attack-strength check that beats the curve
(`BEATEN_CHECK`, `beaten_check_table`, whose marks can be worked out the same way) and a third
certify method (`add_certify_method`); the grid's eps_train 0.1 (seed 0) model trained again on the
ELBO-level bound (`make_bound_inputs`: its twin's files, each quantity moved by `BOUND_CHANGES`); and the
certify_elbo stage's files of listed models (`make_elbo_inputs`: their certify rows on fewer images, and
an ELBO relaxation between CROWN's bound and the attacked ELBO). A test may ask for other eps_train
values of the committed grid (`make_inputs(..., eps=...)`, `params(eps=...)`)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from provae.grid import product
from provae.report.bound_training_files import BoundPatterns
from provae.report.build import Outputs
from provae.report.results import Patterns

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "reports"
EPS = (0.0, 0.1)
SEEDS = (0, 1)
SHIFT = {0: 0.0, 1: -1.5}


def patterns(inputs: Path) -> Patterns:
    return Patterns(models=f"{inputs}/models/{{dataset}}/eps{{eps}}-seed{{seed}}.pt",
                    eval=f"{inputs}/eval/{{dataset}}-eps{{eps}}-seed{{seed}}",
                    metrics=f"{inputs}/metrics/{{dataset}}-eps{{eps}}-seed{{seed}}.json",
                    curves=f"{inputs}/attack_curves/{{dataset}}-eps{{eps}}-seed{{seed}}.csv",
                    strength=f"{inputs}/attack_strength/{{dataset}}-eps{{eps}}-seed{{seed}}.csv",
                    fixed_encoder=f"{inputs}/fixed_encoder/{{dataset}}-eps{{eps}}-seed{{seed}}.csv",
                    training=f"{inputs}/training/{{dataset}}-eps{{eps}}-seed{{seed}}",
                    data=f"{inputs}/data/{{dataset}}.json",
                    certify=f"{inputs}/certify/{{dataset}}-eps{{eps}}-seed{{seed}}",
                    budget=f"{inputs}/attack_budget/{{dataset}}-eps{{eps}}-seed{{seed}}.csv")


def outputs(out: Path) -> Outputs:
    return Outputs(table=str(out / "table1"), curve_table=out / "attack_curves.md", strength_table=out / "attack_strength.md",
                   budget_table=out / "attack_budget.md",
                   fixed_encoder_table=out / "fixed_encoder.md", certify_table=out / "certify.md",
                   summary=out / "metrics.json", index=out / "README.md", figures=out / "figures")


def params(eps=EPS) -> dict:
    """params.yaml with the small grid: MNIST, ``eps`` x SEEDS; the attack-strength check on eps_train 0.1."""
    settings = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings.update(datasets=["mnist"], grid=product(["mnist"], list(eps), list(SEEDS)))
    settings["report"] = {"example_eps_train": list(eps), "example_seed": 0, "reproduction": True}
    settings["evaluate"]["example_eps_attack"] = 0.1
    settings["attack_strength"]["models"] = product(["mnist"], [0.1], list(SEEDS))
    settings["attack_budget"]["models"] = product(["mnist"], [0.0], [0])
    # The optional stages' lists name models of the real grid: none here unless a test lists them.
    settings["bound_training"]["models"] = settings["certify_elbo"]["models"] = {}
    return settings


def paper() -> dict:
    return json.loads((ROOT / "references" / "paper.json").read_text())


# The VAE's ladder: mean attacked ELBO at 100, 400 and 1600 APGD steps, per (ball, eps_attack).
# Tolerance max(0.5, 1 % of |ELBO|). Unclipped: 100 -> 400 lowers eps 0.1 by 1.20 > 0.74, 400 -> 1600
# stays within at both eps: needs 400 steps. Clipped: 400 -> 1600 still lowers eps 0.1 by 1.00 > 0.50.
LADDER = {("unclipped", 0.05): (-42.0, -42.3, -42.4), ("unclipped", 0.1): (-74.0, -75.2, -75.5),
          ("clipped", 0.05): (-33.0, -33.1, -33.2), ("clipped", 0.1): (-44.0, -46.0, -47.0)}
STEPS = (100, 400, 1600)
# An attack-strength check that beats the curve: every challenger changes it by -0.1 (within the tolerance),
# but for these (ball, eps_attack, challenger): (change, beats_curve). At unclipped 0.1 two gated
# challengers beat the curve, random starts by more; at 0.15 only 4x steps; at 0.2 only a cheaper
# (ungated) setting, which marks nothing.
CHALLENGERS = {"apgd_4x_steps": True, "apgd_4x_random_starts": True, "fixed_step_pgd": True, "residual_sign": True,
               "apgd_half_steps": False}  # name: gated
BEATEN_CHECK = {("unclipped", 0.1, "apgd_4x_steps"): (-1.03, True),
                ("unclipped", 0.1, "apgd_4x_random_starts"): (-1.5, True),
                ("unclipped", 0.15, "apgd_4x_steps"): (-2.16, True),
                ("unclipped", 0.2, "apgd_half_steps"): (-3.0, True)}


def ladder_table(ladder: dict = LADDER, steps=STEPS, starts: int = 1) -> pd.DataFrame:
    """stages/attack_budget.py's CSV for ``ladder``, verdict columns worked out by hand's rule."""
    rows = []
    for (ball, eps), values in ladder.items():
        for i, (n, value) in enumerate(zip(steps, values)):
            change = values[i + 1] - value if i + 1 < len(values) else np.nan
            tolerance = max(0.5, 0.01 * abs(value))
            rows.append({"ball": ball, "eps_attack": eps, "steps": n, "random_starts": starts, "elbo_attacked": value,
                         "examples": 64, "seconds": 10.0 * n / 100, "change_at_4x_steps": change, "tolerance": tolerance,
                         "within_tolerance": bool(np.isfinite(change) and change >= -tolerance)})
    return pd.DataFrame(rows).sort_values(["ball", "random_starts", "steps", "eps_attack"], kind="stable")


def beaten_check_table() -> pd.DataFrame:
    """stages/attack_strength.py's CSV for `BEATEN_CHECK`."""
    rows = []
    for ball in ("unclipped", "clipped"):
        for challenger, gated in CHALLENGERS.items():
            for a in (0.1, 0.15, 0.2):
                change, beats = BEATEN_CHECK.get((ball, a, challenger), (-0.1, False))
                rows.append({"ball": ball, "eps_attack": a, "challenger": challenger, "gated": gated, "curve": -75.0,
                             "challenger_elbo": -75.0 + change, "change": change, "change_if_added": change,
                             "tolerance": 0.75, "beats_curve": beats, "seconds": 1.0})
    return pd.DataFrame(rows)


def add_certify_method(found: Patterns, method: str = "elbo", seconds: float = 0.5) -> None:
    """A third certify method in every model's bounds.csv and radii.csv: CROWN's rows, its bound
    halfway to the attacked ELBO where finite, radii 10 % larger."""
    for eps in EPS:
        for seed in SEEDS:
            folder = found.path("certify", "mnist", eps, seed)
            bounds = pd.read_csv(folder / "bounds.csv")
            extra = bounds[bounds["method"] == "crown"].copy()
            extra["method"] = method
            finite = np.isfinite(extra["bound"])
            extra.loc[finite, "bound"] = (extra["bound"] + extra["attacked_elbo"])[finite] / 2
            extra["seconds_per_image"] = seconds
            pd.concat([bounds, extra]).to_csv(folder / "bounds.csv", index=False)
            radii = pd.read_csv(folder / "radii.csv")
            extra = radii[radii["method"] == "crown"].copy()
            extra["method"], extra["radius"] = method, extra["radius"] * 1.1
            pd.concat([radii, extra]).to_csv(folder / "radii.csv", index=False)


def make_inputs(inputs: Path, eps_values=EPS) -> Patterns:
    """Per-model outputs of the small grid (eps_train ``eps_values``) under ``inputs``."""
    found = patterns(inputs)
    source = patterns(REPORTS)
    (inputs / "data").mkdir(parents=True)
    shutil.copy(source.path("data", "mnist", 0), found.path("data", "mnist", 0))
    for eps in eps_values:
        for seed in SEEDS:
            key, real, shift = ("mnist", eps, seed), ("mnist", eps, 0), SHIFT[seed]
            model = found.path("models", *key)
            model.parent.mkdir(parents=True, exist_ok=True)
            model.write_bytes(f"checkpoint {key}".encode())
            shutil.copytree(source.path("eval", *real), found.path("eval", *key))
            shutil.copytree(source.path("training", *real), found.path("training", *key))
            shutil.copytree(source.path("certify", *real), found.path("certify", *key))
            for kind in ("fixed_encoder", "strength"):
                if source.path(kind, *real).exists():
                    found.path(kind, *key).parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(source.path(kind, *real), found.path(kind, *key))
            metrics = json.loads(source.path("metrics", *real).read_text())
            found.path("metrics", *key).parent.mkdir(parents=True, exist_ok=True)
            found.path("metrics", *key).write_text(json.dumps({k: v + shift if k.startswith(("lb_", "elbo_")) else v
                                                               for k, v in metrics.items()}))
            curves = pd.read_csv(source.path("curves", *real))
            for column in [c for c in curves.columns if c.startswith("elbo_attacked_")]:
                curves[column] += shift
            found.path("curves", *key).parent.mkdir(parents=True, exist_ok=True)
            curves.to_csv(found.path("curves", *key), index=False)
    found.path("budget", "mnist", 0.0, 0).parent.mkdir(parents=True, exist_ok=True)
    ladder_table().to_csv(found.path("budget", "mnist", 0.0, 0), index=False)
    return found


# The model of `bound_training.models`: eps_train 0.1, seed 0, trained on BOUND. Its outputs are its IBP-trained
# twin's, each quantity moved: nats added to the clean ELBOs (metrics elbo_*), to the certified bounds at
# eps_train (metrics lb_*), to certify's bounds (bounds.csv), to the attacked ELBOs (the curve's
# elbo_attacked_*); radii (radii.csv) multiplied; the training wall time and device set.
BOUND, TWIN = "elbo_crown", ("mnist", 0.1, 0)
BOUND_CHANGES = {"clean": -0.8, "lb": 2.5, "certified": 3.0, "attacked": 1.25, "radius": 1.5, "seconds": 350.0,
                 "device": None}  # device None: the twin's


def bound_patterns(inputs: Path) -> BoundPatterns:
    return BoundPatterns(models=f"{inputs}/models/{{dataset}}/{{bound}}-eps{{eps}}-seed{{seed}}.pt",
                         eval=f"{inputs}/eval/{{dataset}}-{{bound}}-eps{{eps}}-seed{{seed}}",
                         metrics=f"{inputs}/metrics/{{dataset}}-{{bound}}-eps{{eps}}-seed{{seed}}.json",
                         curves=f"{inputs}/attack_curves/{{dataset}}-{{bound}}-eps{{eps}}-seed{{seed}}.csv",
                         certify=f"{inputs}/certify/{{dataset}}-{{bound}}-eps{{eps}}-seed{{seed}}")


def bound_params(models=(TWIN,)) -> dict:
    """`params()` with `bound_training.models` listing ``models`` (dataset, eps, seed)."""
    settings = params()
    settings["bound_training"] = {"bound": BOUND, "models": {}}
    for dataset, eps, seed in models:
        settings["bound_training"]["models"].update(product([dataset], [eps], [seed]))
    return settings


def make_bound_inputs(found: Patterns, inputs: Path, changes: dict | None = None) -> BoundPatterns:
    """The outputs of TWIN trained on BOUND under ``inputs``: TWIN's (``found``), moved by ``changes``
    (`BOUND_CHANGES` by default; a test flips them)."""
    change = {**BOUND_CHANGES, **(changes or {})}
    bound = bound_patterns(inputs)
    twin, ours = (lambda kind: found.path(kind, *TWIN)), (lambda kind: bound.path(kind, BOUND, *TWIN))
    ours("models").write_bytes(b"checkpoint trained on " + BOUND.encode())
    shutil.rmtree(ours("eval"), ignore_errors=True)
    shutil.copytree(twin("eval"), ours("eval"))
    details = json.loads((twin("eval") / "details.json").read_text())
    details["training"].update(seconds=change["seconds"], device=change["device"] or details["training"]["device"])
    (ours("eval") / "details.json").write_text(json.dumps(details))
    metrics = json.loads(twin("metrics").read_text())
    ours("metrics").write_text(json.dumps({k: v + change["clean"] if k.startswith("elbo_") else
                                           v + change["lb"] if k.startswith("lb_") else v for k, v in metrics.items()}))
    curves = pd.read_csv(twin("curves"))
    for column in [c for c in curves.columns if c.startswith("elbo_attacked_")]:
        curves[column] += change["attacked"]
    curves.to_csv(ours("curves"), index=False)
    ours("certify").mkdir(exist_ok=True)
    bounds = pd.read_csv(twin("certify") / "bounds.csv")
    bounds["bound"] += change["certified"]
    bounds.to_csv(ours("certify") / "bounds.csv", index=False)
    radii = pd.read_csv(twin("certify") / "radii.csv")
    radii["radius"] *= change["radius"]
    radii.to_csv(ours("certify") / "radii.csv", index=False)
    return bound


# certify_elbo's files of a listed model: its certify rows of the headline ball (IBP and CROWN) as if on the
# first `examples` images: the attacked ELBO moved by ELBO_ATTACKED and IBP's bound by ELBO_IBP (so a gap
# closed against certify's own IBP row would differ), and the ELBO relaxation `closes` of the way from
# CROWN's bound to the attacked ELBO where finite; radii: the first images', the ELBO relaxation's
# CROWN's times ELBO_RADIUS.
ELBO_ATTACKED, ELBO_IBP, ELBO_RADIUS = 0.5, -2.0, 1.25


def elbo_patterns(found: Patterns, inputs: Path) -> Patterns:
    return dataclasses.replace(found, certify_elbo=f"{inputs}/certify_elbo/{{dataset}}-eps{{eps}}-seed{{seed}}")


def make_elbo_inputs(found: Patterns, models, examples: int, closes: float = 0.5, seconds: float = 2.0) -> None:
    """certify_elbo's bounds.csv and radii.csv of ``models`` ((dataset, eps, seed)) under ``found``'s pattern."""
    for key in models:
        folder = found.path("certify_elbo", *key)
        folder.mkdir(parents=True, exist_ok=True)
        ball = json.loads((found.path("eval", *key) / "details.json").read_text())["headline_ball"]
        bounds = pd.read_csv(found.path("certify", *key) / "bounds.csv")
        bounds = bounds[(bounds["ball"] == ball) & bounds["method"].isin(["ibp", "crown"])].copy()
        bounds["attacked_elbo"] += ELBO_ATTACKED
        bounds.loc[bounds["method"] == "ibp", "bound"] += ELBO_IBP
        elbo = bounds[bounds["method"] == "crown"].copy()
        finite = np.isfinite(elbo["bound"])
        elbo.loc[finite, "bound"] = (elbo["bound"] + closes * (elbo["attacked_elbo"] - elbo["bound"]))[finite]
        elbo["method"], elbo["seconds_per_image"] = "elbo", seconds
        bounds = pd.concat([bounds, elbo])
        bounds["gap"] = bounds["attacked_elbo"] - bounds["bound"]
        bounds.to_csv(folder / "bounds.csv", index=False)
        radii = pd.read_csv(found.path("certify", *key) / "radii.csv")
        radii = radii[(radii["image"] < examples) & (radii["ball"] == ball)]
        extra = radii[radii["method"] == "crown"].copy()
        extra["method"], extra["radius"] = "elbo", extra["radius"] * ELBO_RADIUS
        pd.concat([radii, extra]).to_csv(folder / "radii.csv", index=False)


def keep_drawn_figures(monkeypatch, modules) -> list:
    """Each figure that ``modules`` would save, drawn and kept instead (a list, filled as they draw):
    tests read its lines and legend without writing a PNG."""
    figures = []

    def keep(fig, path, results, keys, what):
        fig.canvas.draw()
        figures.append(fig)
        return keys

    for module in modules:
        monkeypatch.setattr(module, "save_figure", keep)
    return figures

