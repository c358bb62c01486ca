"""The explicit grid of params.yaml: ids that spell their fields, stage lists inside the grid."""

import pytest
import yaml

from conftest import ROOT
from provae.grid import GridError, GridModel, grid_models, models_of_grid, parse_models, product


def entry(dataset="mnist", eps=0.01, seed=2):
    return {"dataset": dataset, "eps": eps, "seed": seed}


def test_an_id_is_the_stage_suffix_dvc_templates():
    model = GridModel("mnist", 0.01, 2)
    assert (model.id, model.name) == ("mnist-0.01-2", "mnist-eps0.01-seed2")
    assert GridModel("cifar10", 0.0, 0).id == "cifar10-0.0-0"


@pytest.mark.parametrize("key, value, message", [
    ("mnist-0.01-1", entry(), "must spell"),                      # a typo would train under another name
    ("mnist-0.01-2", {"dataset": "mnist", "eps": 0.01}, "dataset, eps and seed"),
    ("mnist--0.1-2", entry(eps=-0.1), "finite number >= 0"),
    ("mnist-nan-2", entry(eps=float("nan")), "finite number >= 0"),
    ("mnist-0-2", entry(eps=0), "as a float"),
    ("mnist-0.01-x", entry(seed="x"), "integer >= 0"),
    ("svhn-0.01-2", entry(dataset="svhn"), "not in `datasets`"),
])
def test_a_bad_entry_is_refused_naming_it(key, value, message):
    with pytest.raises(GridError, match=message) as error:
        parse_models({key: value}, datasets=["mnist"])
    assert key in str(error.value)


def test_an_empty_grid_is_refused():
    with pytest.raises(GridError, match="non-empty"):
        parse_models({})


def test_a_stage_list_outside_the_grid_is_refused_naming_the_model():
    params = {"datasets": ["mnist"], "grid": product(["mnist"], [0.0, 0.1], [0]),
              "attack_strength": {"models": {"mnist-0.05-0": entry(eps=0.05, seed=0)}}}
    with pytest.raises(GridError, match=r"attack_strength.models .*\['mnist-0.05-0'\]"):
        models_of_grid(params, "attack_strength")
    params["attack_strength"]["models"] = {"mnist-0.1-0": entry(eps=0.1, seed=0)}
    assert models_of_grid(params, "attack_strength") == [GridModel("mnist", 0.1, 0)]


def test_product_matches_the_matrix_it_replaced():
    grid = product(["mnist", "cifar10"], [0.0, 0.1], [0, 1])
    assert list(grid)[:3] == ["mnist-0.0-0", "mnist-0.0-1", "mnist-0.1-0"] and len(grid) == 8


@pytest.mark.parametrize("name", ["params.yaml", "profiles/tiny.yaml", "profiles/quick.yaml"])
def test_the_committed_params_and_profiles_hold_valid_grids(name):
    params = yaml.safe_load((ROOT / name).read_text())
    models = grid_models(params)
    assert len(set(models)) == len(models)
    for section in ("attack_strength", "attack_budget", "bound_training", "certify_elbo"):
        if params.get(section, {}).get("models"):  # bound_training's may be empty: no such stages
            assert models_of_grid(params, section)
