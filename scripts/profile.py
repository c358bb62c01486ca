"""Apply a parameter profile (profiles/NAME.yaml) on top of params.yaml.

    python scripts/profile.py quick            # prints `-S key=value` flags for `dvc exp run`
    python scripts/profile.py tiny --write     # writes the merged params.yaml in place

Nested keys in the profile override the same keys in params.yaml; everything else is kept.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import yaml


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key not in base:
            raise KeyError(f"profile key {key!r} is not in params.yaml")
        merged[key] = merge(base[key], value) if isinstance(value, dict) else value
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="profile name: a file profiles/NAME.yaml")
    parser.add_argument("--write", action="store_true", help="rewrite params.yaml instead of printing -S flags")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    override = yaml.safe_load((root / "profiles" / f"{args.name}.yaml").read_text())
    base = yaml.safe_load(Path(args.params).read_text())
    merged = merge(base, override)  # validates every key, in both modes
    if args.write:
        Path(args.params).write_text(yaml.safe_dump(merged, sort_keys=False, default_flow_style=None))
    else:
        # JSON is valid YAML flow style: lists, numbers, null and booleans read back unchanged.
        flags = [f"-S {shlex.quote(f'{key}={json.dumps(value)}')}" for key, value in flatten(override).items()]
        print(" ".join(flags))


if __name__ == "__main__":
    main()
