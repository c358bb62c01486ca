"""Report stage: the paper's Table 1 and Figures 1-4 regenerated beside the paper's values, with
the spread over seeds, plus the attack-curve, attack-strength, attack-budget, certify and
fixed-encoder tables (the package `provae.report`, one module per artifact).

Iterates over the models of the grid (params.yaml `grid`); a missing output is an error, and
nothing is globbed, so a stale output of a model no longer in the grid never shows up. Every
figure carries its provenance (checkpoint hashes, params) in its PNG text chunks, and the index
(reports/README.md) lists it; nothing time-dependent is written, so a re-run is byte-identical.
With --bound-training-table, also the models of `bound_training.models` trained on
`bound_training.bound` beside their IBP-trained twins; their paths: the --bound-* patterns. With
`certify_elbo.models` listed, their ELBO relaxation (stage certify_elbo; path: --certify-elbo) too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import load_params

from provae.report.bound_training_files import BoundPatterns
from provae.report.build import Outputs, Page, ReportError, build_report
from provae.report.results import Patterns

PARAMS = "params.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("models", "eval", "metrics", "curves", "strength", "fixed-encoder", "training", "data-provenance",
                 "certify", "budget"):
        parser.add_argument(f"--{name}", required=True, help="per-model path with {dataset}, {eps} and {seed}")
    for name in ("strength-table", "budget-table", "fixed-encoder-table", "certify-table", "curve-table", "summary",
                 "index", "paper", "figures"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--table", required=True, help="path prefix for table .md/.csv/.tex")
    parser.add_argument("--certify-elbo", help="as --certify, certify_elbo's (needed once certify_elbo.models lists one)")
    page = parser.add_argument_group("REPRODUCTION.md (rendered only with --reproduction)")
    page.add_argument("--reproduction", help="the page to write, e.g. reports/REPRODUCTION.md")
    page.add_argument("--reproduction-template", help="its template, e.g. reports/REPRODUCTION.md.j2")
    page.add_argument("--training-length", help="folder per dataset with {dataset}: the training-length experiments")
    trained = parser.add_argument_group("bound_training.md (written only with --bound-training-table)")
    trained.add_argument("--bound-training-table", help="the page to write, e.g. reports/bound_training.md")
    kinds = ("models", "eval", "metrics", "curves", "certify")
    for kind in kinds:
        trained.add_argument(f"--bound-{kind}", help=f"as --{kind}, for a model trained on {{bound}} (bound_training.bound)")
    args = parser.parse_args()
    if bool(args.reproduction) != bool(args.reproduction_template):
        parser.error("--reproduction and --reproduction-template go together")
    bound = {kind: getattr(args, f"bound_{kind}") for kind in kinds}
    if len({value is None for value in [args.bound_training_table, *bound.values()]}) > 1:
        parser.error("--bound-training-table and --bound-{" + ",".join(kinds) + "} go together")
    patterns = Patterns(models=args.models, eval=args.eval, metrics=args.metrics, curves=args.curves,
                        strength=args.strength, fixed_encoder=args.fixed_encoder, training=args.training,
                        data=args.data_provenance, certify=args.certify, budget=args.budget, certify_elbo=args.certify_elbo)
    outputs = Outputs(table=args.table, curve_table=Path(args.curve_table), strength_table=Path(args.strength_table),
                      budget_table=Path(args.budget_table),
                      fixed_encoder_table=Path(args.fixed_encoder_table), certify_table=Path(args.certify_table),
                      summary=Path(args.summary), index=Path(args.index), figures=Path(args.figures),
                      reproduction=Path(args.reproduction) if args.reproduction else None,
                      bound_training=Path(args.bound_training_table) if args.bound_training_table else None)
    page = Page(template=Path(args.reproduction_template), paper=Path(args.paper), params=Path(PARAMS),
                training_length=args.training_length) if args.reproduction else None
    try:
        build_report(patterns, outputs, load_params(PARAMS), json.loads(Path(args.paper).read_text()), page,
                     BoundPatterns(**bound) if args.bound_training_table else None)
    except ReportError as error:
        raise SystemExit(str(error)) from None


if __name__ == "__main__":
    main()
