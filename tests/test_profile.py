"""scripts/profile.py writes `dvc exp run -S` values DVC's override grammar accepts."""

import importlib.util
from pathlib import Path

import yaml

# Loaded by path: the standard library has a module named `profile` too.
_spec = importlib.util.spec_from_file_location(
    "provae_profile_script", Path(__file__).resolve().parent.parent / "scripts" / "profile.py")
_module = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_module)
override_value = _module.override_value


def test_override_values_read_back_unchanged_and_dict_keys_are_bare():
    values = [[0.0, 0.01], None, True, 3, 1.0e-3, "mnist", [{"pgd_steps": 160}, {"pgd_restarts": 4, "eot": 2}]]
    for value in values:
        text = override_value(value)
        assert yaml.safe_load(text) == value
    assert override_value([{"pgd_steps": 160}]) == "[{pgd_steps: 160}]"  # Hydra rejects quoted keys
