"""Shared by every report artifact: the Results loader and the spread over seeds.

Reads every per-model output of the grid once (metrics, evaluation details, attack curves,
checkpoint md5), iterating over the models of params.yaml's `grid`; a missing output is an error,
and nothing is globbed, so a stale output of a model no longer in the grid never shows up. The
spread statistics (mean, sample std, min, max over seeds) are what every table and figure shows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from provae.files import file_digest
from provae.grid import GridModel, grid_models

QUANTITIES = {"lb_train": "LB train", "lb_test": "LB test", "elbo_test": "ELBO test"}
BALLS = ("unclipped", "clipped")
BALL_TITLES = {"unclipped": "unclipped ball (paper eq. 15)", "clipped": "ball clipped to [0, 1] (valid images)"}


@dataclass(frozen=True)
class Patterns:
    """Where each per-model output lives: dvc.yaml's paths, with {dataset}, {eps} and {seed}."""

    models: str
    eval: str
    metrics: str
    curves: str
    strength: str
    fixed_encoder: str
    training: str
    data: str
    certify: str
    budget: str                          # the attack-budget ladder per model (attack_budget.models)
    certify_elbo: str | None = None      # certify_elbo's folder per model (certify_elbo.models; needed once it lists one)

    def path(self, kind: str, dataset: str, eps: float, seed: int | None = None) -> Path:
        return Path(getattr(self, kind).format(dataset=dataset, eps=eps, seed=seed))


def read_required(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: {what}")
    return path


def model_id(dataset: str, eps: float, seed: int) -> str:
    """The per-model output name, as the grid spells it (`mnist-eps0.01-seed2`)."""
    return GridModel(dataset, float(eps), int(seed)).name


def spread(values) -> dict:
    """Mean, sample std, min and max over seeds (std is nan with one seed)."""
    values = np.asarray(list(values), dtype=float)
    return {"mean": values.mean(), "std": values.std(ddof=1) if len(values) > 1 else np.nan,
            "min": values.min(), "max": values.max(), "n": len(values)}


def show(stats: dict, digits: int = 2) -> str:
    text = f"{stats['mean']:.{digits}f}"
    return text if np.isnan(stats["std"]) else f"{text} ± {stats['std']:.{digits}f}"


def separated(a: dict, b: dict) -> bool | None:
    """True when the seed ranges of two cells do not overlap: a difference beyond the spread.
    None with fewer than two seeds on either side: there is no spread to judge against."""
    if min(a["n"], b["n"]) < 2:
        return None
    return bool(a["min"] > b["max"] or b["min"] > a["max"])


def balls_in_order(headline: str) -> tuple[str, ...]:
    """The headline ball first, then the other."""
    return (headline, *[b for b in BALLS if b != headline])


class Results:
    """Every per-model output of the grid, read once."""

    def __init__(self, patterns: Patterns, params: dict):
        self.patterns, self.params = patterns, params
        self.grid = grid_models(params)
        self.datasets = list(dict.fromkeys(m.dataset for m in self.grid))
        self.eps_grid = sorted({m.eps for m in self.grid})
        self.seeds = sorted({m.seed for m in self.grid})
        self.labels = {d: json.loads(read_required(patterns.path("data", d, 0), "run the data stage").read_text())["label"]
                       for d in self.datasets}
        self.metrics, self.details, self.curves, self.md5 = {}, {}, {}, {}
        for key in self.keys():
            hint = f"evaluate {model_id(*key)} first"
            self.metrics[key] = json.loads(read_required(patterns.path("metrics", *key), hint).read_text())
            self.details[key] = json.loads(read_required(patterns.path("eval", *key) / "details.json", hint).read_text())
            self.curves[key] = pd.read_csv(read_required(patterns.path("curves", *key), hint)).set_index("eps_attack")
            self.md5[key] = file_digest(read_required(patterns.path("models", *key), f"train {model_id(*key)} first"), "md5")
        self.headline = self.details[self.keys()[0]]["headline_ball"]
        self.methods = [str(m) for m in params["certify"]["methods"]]  # certify's bound methods, in params' order

    def keys(self, dataset: str | None = None, eps: float | None = None) -> list[tuple[str, float, int]]:
        return [(d, e, s) for d in self.datasets for e in self.eps_grid for s in self.seeds
                if GridModel(d, e, s) in self.grid and d == (dataset or d) and e == (e if eps is None else eps)]

    def eps_of(self, dataset: str) -> list[float]:
        """The eps_train values the grid holds for ``dataset``."""
        return [e for e in self.eps_grid if self.keys(dataset, e)]

    def over_seeds(self, dataset: str, eps: float, value) -> dict:
        return spread(value(key) for key in self.keys(dataset, eps))

    def arrays(self, dataset: str, eps: float, seed: int) -> dict:
        path = read_required(self.patterns.path("eval", dataset, eps, seed) / "figure_arrays.npz", "evaluate it first")
        with np.load(path) as arrays:
            return dict(arrays)

    def per_model_csv(self, kind: str, dataset: str, eps: float, name: str = "") -> pd.DataFrame:
        """One per-model CSV (``kind``'s pattern, then ``name`` inside it), concatenated over the seeds."""
        paths = [self.patterns.path(kind, *key) / name for key in self.keys(dataset, eps)]
        return pd.concat([pd.read_csv(read_required(path, f"run the {kind} stage first")) for path in paths])

    def certify_csv(self, dataset: str, eps: float, name: str) -> pd.DataFrame:
        """A certify output (bounds.csv or radii.csv) over the seeds, rows of `certify.methods` only;
        a method the params list but a file lacks is an error naming the file."""
        return pd.concat([read_certify(self.patterns.path("certify", *key) / name, self.methods, "run the certify stage first")
                          for key in self.keys(dataset, eps)])


def read_certify(path: Path, methods: list[str], hint: str, key: str = "certify.methods") -> pd.DataFrame:
    """One certify output (bounds.csv or radii.csv), rows of ``methods`` (params' ``key``) only; a
    missing file, or a method it lacks, is an error naming the file and saying what to run (``hint``)."""
    table = pd.read_csv(read_required(path, hint))
    missing = [m for m in methods if m not in set(table["method"])]
    if missing:
        raise FileNotFoundError(f"{path} has no rows of method {missing} ({key}): {hint}")
    return table[table["method"].isin(methods)]
