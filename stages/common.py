"""What every stage script needs: its params, its outputs written atomically, and the shared
prologue and epilogue of the per-model stages."""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable

import numpy as np
import pandas as pd
import yaml

from provae.files import atomic_write, write_json

__all__ = ["end_with_audit", "eps_value", "load_params", "per_model_stage", "run_stage", "write_csv", "write_json",
           "write_npz"]


def load_params(path: str | os.PathLike = "params.yaml") -> dict:
    with open(path) as handle:
        return yaml.safe_load(handle)


def write_csv(path: str | os.PathLike, table: pd.DataFrame, suffix: str = ".partial") -> None:
    """A stage's table, as every stage writes one (6 significant digits, no index), atomically."""
    with atomic_write(path, suffix=suffix) as handle:
        table.to_csv(handle, index=False, float_format="%.6g")


def write_npz(path: str | os.PathLike, arrays: dict) -> None:
    """Compressed .npz, atomically."""
    with atomic_write(path, "wb") as handle:
        np.savez_compressed(handle, **arrays)


def eps_value(text: str) -> float:
    """argparse type for eps: a finite number >= 0, with a message naming the problem."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"eps must be a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"eps must be finite and >= 0, got {text!r}")
    return value


def per_model_stage(description: str, outputs: dict[str, str], device_params: str = "evaluate",
                    argv: list[str] | None = None, model_list: str | None = None) -> tuple[argparse.Namespace, dict, object]:
    """The prologue of a stage that evaluates one trained model: its command line (``--eps-train
    --seed --model --data`` plus ``outputs``, flag -> help, all required), params.yaml, and the
    model loaded on ``params[device_params]["device"]`` with `evaluate`'s images
    (a ``provae.evaluation.LoadedModel``). A stage with its own list of models
    (``params[model_list]["models"]``) refuses, before loading anything, a list that names a model
    outside the grid: after a dataset switch, it would otherwise fail on a missing file."""
    # Imported here, not at the top: the data and train stages import this module too, and must not
    # depend on the evaluation protocol (dvc.yaml); every caller imports provae.evaluation itself.
    from provae.evaluation import load_for_evaluation

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--eps-train", required=True, type=eps_value)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    for flag, help_text in outputs.items():
        parser.add_argument(flag, required=True, help=help_text)
    args = parser.parse_args(argv)
    params = load_params()
    if model_list is not None:
        from provae.grid import models_of_grid

        models_of_grid(params, model_list)
    loaded = load_for_evaluation(args.model, args.eps_train, args.seed, args.data, params[device_params]["device"])
    return args, params, loaded


def end_with_audit(audits: list, model: str, see: str) -> None:
    """The epilogue of a stage that audits certificates (``provae.certificate_audit``): print which
    bounds were vacuous, and exit non-zero naming ``model``, each failing eps and ball, and the
    file to look at (``see``) if any audit failed."""
    from provae.certificate_audit import audit_failure, vacuous_note  # as in per_model_stage

    note = vacuous_note(audits, model)
    if note:
        print(note)
    failure = audit_failure(audits, model)
    if failure:
        sys.exit(f"{failure}\n(see {see})")


def run_stage(main: Callable[[], None], stage: str, errors: tuple[type[Exception], ...] = ()) -> None:
    """Run a stage's ``main``; a bad value or one of ``errors`` (``provae.data.DataError``, say)
    exits non-zero with one line naming the stage instead of a traceback."""
    try:
        main()
    except (ValueError, *errors) as error:
        sys.exit(f"{stage} stage failed: {error}")
