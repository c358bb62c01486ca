"""The outputs of the models of `bound_training.models` and of their IBP-trained twins, as
reports/bound_training.md and REPRODUCTION.md read them: where they live (`BoundPatterns`), which
models are listed, and each model's metrics, attack curve, certify tables and checkpoint digest
(`read_pairs`). No paper counterpart (the paper trains on IBP's bound alone), and no figure or
table of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from provae.files import file_digest
from provae.grid import GridModel, models_of_grid
from provae.report.certify import mean_bounds, median_radii
from provae.report.results import Results, read_certify, read_required

EPS_ATTACK = (0.05, 0.1)  # issue 22's eps_attack values; the verdict reads the last


@dataclass(frozen=True)
class BoundPatterns:
    """Where the per-model outputs of a model trained on another bound live: dvc.yaml's paths of
    `train_bound`, `evaluate_bound` and `certify_bound`, with {dataset}, {bound}, {eps} and {seed}."""

    models: str
    eval: str
    metrics: str
    curves: str
    certify: str

    def __post_init__(self):
        lacking = [kind for kind, pattern in vars(self).items() if "{bound}" not in pattern]
        if lacking:  # it would name the IBP-trained twin's file: the page would set a model beside itself
            raise ValueError(f"the bound_training patterns of {lacking} have no {{bound}}: {[vars(self)[k] for k in lacking]}")

    def path(self, kind: str, bound: str, dataset: str, eps: float, seed: int) -> Path:
        return Path(getattr(self, kind).format(dataset=dataset, bound=bound, eps=eps, seed=seed))


def bound_models(params: dict) -> list[GridModel]:
    """The models of `bound_training.models`, each a model of the grid (its IBP-trained twin, checked
    by `models_of_grid`); none when the list is empty or the section absent."""
    if not (params.get("bound_training") or {}).get("models"):
        return []
    return models_of_grid(params, "bound_training")


def variant_name(model: GridModel, bound: str) -> str:
    """The per-model output name of ``model`` trained on ``bound``: `mnist-elbo_crown-eps0.01-seed0`."""
    return f"{model.dataset}-{bound}-eps{model.eps!r}-seed{model.seed}"


@dataclass(frozen=True)
class ModelFiles:
    """One model's outputs, as the page reads them."""

    name: str
    paths: dict            # kind -> file (metrics, details, curves, bounds, radii, models)
    metrics: dict
    details: dict
    curve: pd.DataFrame    # indexed by eps_attack
    bounds: pd.DataFrame   # certify.mean_bounds: indexed by (eps_attack, method)
    radii: pd.Series       # certify.median_radii: indexed by (tau, method)
    taus: list
    md5: str


def read_model(name: str, path_of, methods: list[str], ball: str, stages: dict) -> ModelFiles:
    """A model's metrics, details, attack curve, certify outputs and checkpoint md5; a missing file
    names the stage that writes it (``stages``: train, evaluate, certify -> the stage's name), a
    missing eps_attack the file."""
    paths = {"metrics": path_of("metrics"), "details": path_of("eval") / "details.json", "curves": path_of("curves"),
             "bounds": path_of("certify") / "bounds.csv", "radii": path_of("certify") / "radii.csv",
             "models": path_of("models")}
    writer = {"models": "train", "metrics": "evaluate", "details": "evaluate", "curves": "evaluate", "bounds": "certify",
              "radii": "certify"}
    hint = {kind: f"run {stages[stage]} first" for kind, stage in writer.items()}
    for kind in ("models", "metrics", "details", "curves"):
        read_required(paths[kind], hint[kind])
    details = json.loads(paths["details"].read_text())
    if details["headline_ball"] != ball:
        raise ValueError(f"{paths['details']}: headline ball {details['headline_ball']!r}, not the grid's {ball!r}")
    curve = pd.read_csv(paths["curves"]).set_index("eps_attack")
    bounds = mean_bounds(read_certify(paths["bounds"], methods, hint["bounds"]), ball)
    radii, taus = median_radii(read_certify(paths["radii"], methods, hint["radii"]))
    for a in EPS_ATTACK:
        if a not in curve.index or any((a, m) not in bounds.index for m in methods):
            raise ValueError(f"{paths['curves']} or {paths['bounds']} has no eps_attack {a:g}: bound_training.md "
                             f"compares at eps_attack {', '.join(f'{e:g}' for e in EPS_ATTACK)} (evaluate.eps_attack)")
    return ModelFiles(name, paths, json.loads(paths["metrics"].read_text()), details, curve, bounds, radii, taus,
                      file_digest(paths["models"], "md5"))


@dataclass(frozen=True)
class Pair:
    """A model of `bound_training.models`: its IBP-trained twin's files and ours."""

    model: GridModel
    label: str
    twin: ModelFiles
    ours: ModelFiles


def read_pairs(results: Results, patterns: BoundPatterns | None, models: list[GridModel], bound: str) -> list[Pair]:
    """Each listed model's files beside its twin's; a missing one names the stage that writes it."""
    pairs = []
    for model in models:
        twin = read_model(model.name, lambda kind, m=model: results.patterns.path(kind, m.dataset, m.eps, m.seed),
                          results.methods, results.headline, {"train": f"train@{model.id}",
                                                              "evaluate": f"evaluate@{model.id}",
                                                              "certify": f"certify@{model.id}"})
        ours = read_model(variant_name(model, bound),
                          lambda kind, m=model: patterns.path(kind, bound, m.dataset, m.eps, m.seed), results.methods,
                          results.headline, {"train": f"train_bound@{model.id}", "evaluate": f"evaluate_bound@{model.id}",
                                             "certify": f"certify_bound@{model.id}"})
        pairs.append(Pair(model, results.labels[model.dataset], twin, ours))
    return pairs


def bound_name(results: Results) -> str:
    return (results.params.get("bound_training") or {}).get("bound", "another bound")
