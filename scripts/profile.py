"""Apply a parameter profile (profiles/NAME.yaml) on top of params.yaml.

    python scripts/profile.py quick --run      # runs it as a DVC experiment: dvc exp run -S ...
    python scripts/profile.py quick            # prints that command, shell-quoted
    python scripts/profile.py tiny --write     # writes the merged params.yaml in place

Nested keys in the profile override the same keys in params.yaml; everything else is kept. A model
list (`grid`, `attack_strength.models`, ...) is replaced whole: a profile's grid is its own models,
not the full grid plus them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import yaml


MODEL_LISTS = {"grid", "models"}  # keys whose dict a profile replaces instead of merging into


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key not in MODEL_LISTS:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def override_value(value) -> str:
    """A value in DVC's `-S` (Hydra) override grammar: like JSON, but dict keys are bare words."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{key}: {override_value(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(override_value(item) for item in value) + "]"
    return json.dumps(value)  # numbers, null, true/false, and strings in double quotes


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            raise KeyError(f"profile key {key!r} is not in params.yaml")
        replace = key in MODEL_LISTS or not isinstance(value, dict)
        merged[key] = value if replace else merge(base[key], value)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="profile name: a file profiles/NAME.yaml")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--run", action="store_true", help="run `dvc exp run` with the profile's -S flags")
    mode.add_argument("--write", action="store_true", help="rewrite params.yaml with the profile applied")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    override = yaml.safe_load((root / "profiles" / f"{args.name}.yaml").read_text())
    base = yaml.safe_load(Path(args.params).read_text())
    merged = merge(base, override)  # validates every key, in both modes
    if args.write:
        Path(args.params).write_text(yaml.safe_dump(merged, sort_keys=False, default_flow_style=None))
        return
    command = ["dvc", "exp", "run"]
    for key, value in flatten(override).items():
        if key.rsplit(".", 1)[-1] in MODEL_LISTS:  # DVC merges a dict given with `key=`: delete, then add
            command += ["-S", f"~{key}", "-S", f"+{key}={override_value(value)}"]
        else:
            command += ["-S", f"{key}={override_value(value)}"]
    if args.run:
        sys.exit(subprocess.call(command))
    print(shlex.join(command))


if __name__ == "__main__":
    main()
