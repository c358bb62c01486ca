"""The experiment grid: every model named in params.yaml, as an explicit list keyed by model id.

A product matrix (datasets x eps_train x seeds) gives every dataset the same seeds; an explicit
list lets MNIST hold three seeds while CIFAR-10 holds two, on one branch. The id is the DVC stage
suffix (`train@mnist-0.01-2`), so it must spell the entry's own fields: a typo would otherwise
train one model under another's name. This module imports nothing of the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


class GridError(ValueError):
    """params.yaml names a model the grid cannot hold; the message names the entry."""


@dataclass(frozen=True, order=True)
class GridModel:
    dataset: str
    eps: float
    seed: int

    @property
    def id(self) -> str:
        """The stage suffix: `mnist-0.01-2` (eps as YAML writes a float, which is how DVC templates it)."""
        return f"{self.dataset}-{self.eps!r}-{self.seed}"

    @property
    def name(self) -> str:
        """The per-model output name: `mnist-eps0.01-seed2`."""
        return f"{self.dataset}-eps{self.eps!r}-seed{self.seed}"


def parse_models(entries: dict, datasets: list[str] | None = None, where: str = "grid") -> list[GridModel]:
    """Validated models of a ``{id: {dataset, eps, seed}}`` block, in the order params.yaml lists them."""
    if not isinstance(entries, dict) or not entries:
        raise GridError(f"{where} must be a non-empty mapping of model id -> {{dataset, eps, seed}}")
    models = []
    for key, entry in entries.items():
        if not isinstance(entry, dict) or not {"dataset", "eps", "seed"} <= set(entry):
            raise GridError(f"{where}.{key} must give dataset, eps and seed, got {entry!r}")
        eps, seed = entry["eps"], entry["seed"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
            raise GridError(f"{where}.{key}: eps must be a finite number >= 0, got {eps!r}")
        if isinstance(eps, int):
            raise GridError(f"{where}.{key}: write eps as a float ({float(eps)!r}), so stage names and paths agree")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise GridError(f"{where}.{key}: seed must be an integer >= 0, got {seed!r}")
        model = GridModel(str(entry["dataset"]), float(eps), seed)
        if key != model.id:
            raise GridError(f"{where}.{key}: the id must spell the entry's fields, {model.id!r}")
        if datasets is not None and model.dataset not in datasets:
            raise GridError(f"{where}.{key}: dataset {model.dataset!r} is not in `datasets` {datasets} "
                            "(the data stage prepares only those)")
        models.append(model)
    return models


def grid_models(params: dict) -> list[GridModel]:
    """The models of params.yaml's grid."""
    return parse_models(params["grid"], params["datasets"])


def models_of_grid(params: dict, section: str) -> list[GridModel]:
    """A stage's own model list (``params[section]["models"]``), each of which must be in the grid."""
    grid = set(grid_models(params))
    models = parse_models(params[section]["models"], params["datasets"], where=f"{section}.models")
    outside = [m.id for m in models if m not in grid]
    if outside:
        raise GridError(f"{section}.models names models that are not in the grid (`grid` in params.yaml): "
                        f"{outside}; list models of the grid, or add these to it")
    return models


def product(datasets: list[str], eps_train: list[float], seeds: list[int]) -> dict:
    """A ``grid`` block for every (dataset, eps, seed): what the matrix grid used to be."""
    models = [GridModel(d, float(e), int(s)) for d in datasets for e in eps_train for s in seeds]
    return {m.id: {"dataset": m.dataset, "eps": m.eps, "seed": m.seed} for m in models}


def model_name(eps_train: float) -> str:
    """The label every table and figure gives a model."""
    return "VAE" if eps_train == 0 else f"proVAE eps_train={eps_train:g}"
