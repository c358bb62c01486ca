"""Write the experiment grid of params.yaml as a product of datasets, eps values and seeds.

    python scripts/grid.py --datasets fashion_mnist --eps 0.0 0.01 0.1 --seeds 0           # print the block
    python scripts/grid.py --datasets fashion_mnist --eps 0.0 0.01 0.1 --seeds 0 --write   # switch to it

`--write` rewrites `datasets`, `grid`, and the model lists of the stages that check models
(`attack_strength.models`, `attack_budget.models`, `bound_training.models`): each keeps its (eps, seed) choices, moved onto
the new datasets, so a dataset switch runs end to end. Comments in params.yaml are kept.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap

from provae.grid import GridModel, parse_models, product

STAGE_MODEL_LISTS = ("attack_strength", "attack_budget", "bound_training", "certify_elbo")


def flow(entry: dict) -> CommentedMap:
    """One model per line, as params.yaml writes them."""
    mapping = CommentedMap(entry)
    mapping.fa.set_flow_style()
    return mapping


def moved(models: dict, grid: dict, section: str) -> dict:
    """A stage's model list carried onto the new grid: the same (eps, seed) on every new dataset."""
    wanted = {(m.eps, m.seed) for m in parse_models(models, where=f"{section}.models")}
    kept = {key: entry for key, entry in grid.items() if (entry["eps"], entry["seed"]) in wanted}
    if not kept:
        raise SystemExit(f"{section}.models {sorted(models)} has no (eps, seed) in the new grid: "
                         f"edit {section}.models in params.yaml to name models of the grid")
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", required=True)
    parser.add_argument("--eps", nargs="+", type=float, required=True)
    parser.add_argument("--seeds", nargs="+", type=int, required=True)
    parser.add_argument("--write", action="store_true", help="rewrite params.yaml")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    grid = product(args.datasets, args.eps, args.seeds)
    parse_models(grid, args.datasets)  # the same checks as the stages
    if not args.write:
        for key, entry in grid.items():
            print(f"  {key}: {{dataset: {entry['dataset']}, eps: {entry['eps']!r}, seed: {entry['seed']}}}")
        return
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.width = 4096
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    path = Path(args.params)
    params = yaml.load(path.read_text())
    params["datasets"][:] = args.datasets  # in place: keeps the list's style and comment
    params["grid"] = CommentedMap((key, flow(entry)) for key, entry in grid.items())
    for section in STAGE_MODEL_LISTS:
        if section in params and params[section].get("models"):  # an empty list stays empty
            params[section]["models"] = CommentedMap(
                (key, flow(entry)) for key, entry in moved(dict(params[section]["models"]), grid, section).items())
    with open(path, "w") as handle:
        yaml.dump(params, handle)
    print(f"{path}: {len(grid)} models of {', '.join(args.datasets)}: " + ", ".join(GridModel(
        e["dataset"], e["eps"], e["seed"]).id for e in grid.values()), file=sys.stderr)


if __name__ == "__main__":
    main()
