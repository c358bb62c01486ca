"""reports/bound_training.md: no paper counterpart (the paper trains on IBP's bound alone). Each model
of `bound_training.models` trained again on the bound `bound_training.bound` (the ELBO-level linear
bound, CROWN-IBP: README, "Training on the ELBO-level bound"), set beside its IBP-trained twin of the
grid (same dataset, eps_train, seed and `train` settings): the clean test ELBO, the certified bound
at eps_train (Table 1's `lb_test`), each certify method's bound and the attacked ELBO at eps_attack
0.05 and 0.1 (certify.md's means), the median certified radius per tau (certify.md's medians), the
training wall time. Every number links to its file; the verdict on the claim "a tighter training
bound buys certified robustness at less cost in clean ELBO" is computed from them.
"""

from __future__ import annotations

import math
from pathlib import Path

from provae.grid import GridModel, model_name
from provae.report.bound_training_files import EPS_ATTACK, BoundPatterns, ModelFiles, bound_name, read_pairs
from provae.report.certify import cell
from provae.report.plotting import method_title
from provae.report.reproduction import Comparison, Sources, claim_verdict, compare, listing, shown
from provae.report.results import BALL_TITLES, Results, spread

CLAIM = {"reproduces": "supported", "partly": "partly supported", "does not reproduce": "not supported"}
HIGHER = {"above": "higher than", "below": "lower than", "matches": "equal to"}


def versus(ours: float, twin: float) -> Comparison:
    """`reproduction.compare` on one seed each; two equal values, vacuous ones included, match."""
    if ours == twin:
        return Comparison("matches", 0.0, None)
    return compare(spread([ours]), spread([twin]))


def difference(ours: float, twin: float, fmt: str) -> str:
    """``ours`` minus ``twin`` as the page prints it (`reproduction.shown`); n/a where either is not finite."""
    return shown(ours - twin, fmt) if math.isfinite(ours) and math.isfinite(twin) else ("0" if ours == twin else "n/a")


def rows(twin: ModelFiles, ours: ModelFiles, model: GridModel, methods: list[str], ball: str, src: Sources) -> list:
    """(quantity, twin's cell, ours, difference) per row of a model's table."""
    out = []

    def row(what, kind, value, where, fmt, diff_fmt):
        a, b = value(twin), value(ours)
        out.append((what, src.q(a, fmt, twin.paths[kind], where), src.q(b, fmt, ours.paths[kind], where),
                    difference(b, a, diff_fmt)))

    row("clean test ELBO", "metrics", lambda m: m.metrics["elbo_test"], "key elbo_test", "{:.2f}", "{:+.2f}")
    row(f"certified bound (IBP) at eps_train {model.eps:g}, test set", "metrics", lambda m: m.metrics["lb_test"],
        "key lb_test", "{:.2f}", "{:+.2f}")
    for a in EPS_ATTACK:
        for method in methods:
            row(f"certified bound ({method_title(method)}) at eps_attack {a:g}, certify's images", "bounds",
                lambda m: m.bounds.loc[(a, method), "bound"],
                f"row ball={ball}, eps_attack={a:g}, method={method}, column bound (mean over certify's images)",
                "{:.2f}", "{:+.2f}")
    for tau in twin.taus:
        for method in methods:
            row(f"median certified radius ({method_title(method)}), ELBO drop <= {tau}", "radii",
                lambda m: m.radii.loc[(tau, method)], f"rows tau={tau}, method={method}: median of column radius",
                "{:.4f}", "{:+.4f}")
    for a in EPS_ATTACK:
        row(f"attacked ELBO at eps_attack {a:g}", "curves", lambda m: m.curve.loc[a, f"elbo_attacked_{ball}"],
            f"row eps_attack={a:g}, column elbo_attacked_{ball}", "{:.2f}", "{:+.2f}")
    devices = [m.details["training"]["device"] for m in (twin, ours)]
    seconds = [float(m.details["training"]["seconds"]) for m in (twin, ours)]
    diff = (f"{seconds[1] - seconds[0]:+.1f} s (x{seconds[1] / seconds[0]:.2f})" if devices[0] == devices[1]
            else f"n/a: trained on {devices[0]} and {devices[1]}")
    out.append(("training wall time", *[f"{src.q(s, '{:.1f}', m.paths['details'], 'key training.seconds')} s on {d}"
                                        for m, s, d in zip((twin, ours), seconds, devices)], diff))
    return out


def model_verdict(model: GridModel, label: str, bound: str, twin: ModelFiles, ours: ModelFiles, methods) -> tuple:
    """(the claim's word for this model, its sentences): higher certified bounds at eps_train and
    at the last eps_attack by every certify method, and a clean ELBO at least the twin's."""
    last = EPS_ATTACK[-1]
    at_train = versus(ours.metrics["lb_test"], twin.metrics["lb_test"])
    at_last = {m: versus(ours.bounds.loc[(last, m), "bound"], twin.bounds.loc[(last, m), "bound"]) for m in methods}
    clean = versus(ours.metrics["elbo_test"], twin.metrics["elbo_test"])
    robust = at_train.word == "above" and all(c.word == "above" for c in at_last.values())
    cheap = clean.word != "below"
    word = CLAIM[claim_verdict([robust, cheap])]

    def nats(c: Comparison) -> str:
        if c.word == "matches":
            return ""
        return f" ({shown(c.difference, '{:+.2f}')} nats)" if math.isfinite(c.difference) else " (one of the two vacuous)"

    cost = {"above": f"higher, a gain of {clean.difference:.2f} nats", "matches": "equal",
            "below": f"lower, a cost of {-clean.difference:.2f} nats"}[clean.word]
    text = (f"{label} {model_name(model.eps)}, seed {model.seed}, trained on {bound}: its certified bound at eps_train "
            f"{model.eps:g} is {HIGHER[at_train.word]} its IBP-trained twin's{nats(at_train)}; at eps_attack {last:g} it "
            f"is {listing(f'{HIGHER[c.word].split()[0]} by {method_title(m)}{nats(c)}' for m, c in at_last.items())}; its "
            f"clean test ELBO is {cost}. The claim is {word} here (higher certified bounds at eps_train and at eps_attack "
            f"{last:g} by every certify method: {'yes' if robust else 'no'}; a clean ELBO at least the twin's: "
            f"{'yes' if cheap else 'no'}).")
    return word, text


def summary_of(models: list[GridModel], words: list[str]) -> str:
    """'supported for a; partly supported for b and c': the verdict words over the listed models."""
    found = {w: [m.id for m, v in zip(models, words) if v == w] for w in CLAIM.values()}
    return "; ".join(f"{w} for {listing(ids)}" for w, ids in found.items() if ids)


def bound_training_markdown(results: Results, patterns: BoundPatterns | None, models: list[GridModel], page: Path) -> str:
    """The page: per model a table beside its IBP-trained twin, then the verdict; with no model listed,
    how to add one."""
    bound = bound_name(results)
    lines = [f"# Training on the ELBO-level bound: {bound} beside IBP", ""]
    if not models:
        example = next((m for m in results.grid if m.eps > 0), results.grid[0])
        return "\n".join(lines + [
            "No model is listed yet: `bound_training.models` in params.yaml is empty. To add one, list a model of the grid "
            f"there (its IBP-trained twin: same dataset, eps_train and seed), e.g. `{example.id}: {{dataset: "
            f"{example.dataset}, eps: {example.eps!r}, seed: {example.seed}}}`, then run `dvc repro`: it trains the model on "
            f"`bound_training.bound` (stage `train_bound`), evaluates and certifies it (`evaluate_bound`, `certify_bound`), "
            "and this page sets it beside its twin.", ""])
    src, methods, ball = Sources(Path(page).parent), results.methods, results.headline
    lines += [f"Each model of `bound_training.models` trained again on `{bound}` with the grid's `train` settings, beside "
              f"its IBP-trained twin of the grid (same dataset, eps_train and seed). Threat model: the {BALL_TITLES[ball]}. "
              "Nats per image. 'test set': the evaluate stage's bound at eps_train (Table 1's LB test); 'certify's images': "
              "the certify stage's test images with the attacks' own noise, the same for both models of a seed (certify.md's "
              "means and medians). 'difference': "
              f"{bound} minus IBP; for every row but the wall time, higher is better. Each number links to its file; "
              "hover for its row and column.", ""]
    verdicts = []
    for pair in read_pairs(results, patterns, models, bound):
        model, twin, ours = pair.model, pair.twin, pair.ours
        lines += [f"## {pair.label}, {model_name(model.eps)}, seed {model.seed}", "",
                  f"| quantity | IBP-trained (`{twin.name}`) | {bound}-trained (`{ours.name}`) | difference |",
                  "|---|---|---|---|"]
        lines += [f"| {' | '.join(cell(c) for c in r)} |" for r in rows(twin, ours, model, methods, ball, src)]
        lines += ["", f"Checkpoints: IBP-trained `{twin.md5}` ([{src.link(twin.paths['models'])}]"
                  f"({src.link(twin.paths['models'])})), {bound}-trained `{ours.md5}` ([{src.link(ours.paths['models'])}]"
                  f"({src.link(ours.paths['models'])})) (md5).", ""]
        verdicts.append(model_verdict(model, pair.label, bound, twin, ours, methods))
    lines += ["## Verdict", "",
              " ".join(text for _, text in verdicts) + f" Over the listed models, the claim (a tighter training bound buys "
              f"certified robustness at less cost in clean ELBO) is {summary_of(models, [w for w, _ in verdicts])}. One "
              "seed per model: no spread to judge these differences against.", ""]
    return "\n".join(lines)


def bound_training_quantities(results: Results, patterns: BoundPatterns | None, models: list[GridModel], src: Sources,
                              page: Path) -> dict:
    """What REPRODUCTION.md says of training on the bound: per listed model, each side's clean test
    ELBO, certified bound at eps_train and at the last eps_attack per certify method, median
    certified radius at the first tau, training wall time, and the verdict word of
    bound_training.md; and the words over all listed models."""
    bound, methods, ball = bound_name(results), results.methods, results.headline
    last, out = EPS_ATTACK[-1], []
    for pair in read_pairs(results, patterns, models, bound):
        model, twin, ours = pair.model, pair.twin, pair.ours

        def both(kind, value, where, fmt):
            return {"twin": src.q(value(twin), fmt, twin.paths[kind], where),
                    "ours": src.q(value(ours), fmt, ours.paths[kind], where)}

        tau = twin.taus[0]
        devices = [m.details["training"]["device"] for m in (twin, ours)]
        time = both("details", lambda m: float(m.details["training"]["seconds"]), "key training.seconds", "{:.0f}")
        word, _ = model_verdict(model, pair.label, bound, twin, ours, methods)
        out.append({
            "id": model.id, "label": pair.label, "name": model_name(model.eps), "seed": model.seed,
            "eps": src.q(model.eps, "{:g}", None, ""), "word": word,
            "clean": both("metrics", lambda m: m.metrics["elbo_test"], "key elbo_test", "{:.2f}"),
            "lb": both("metrics", lambda m: m.metrics["lb_test"], "key lb_test", "{:.2f}"),
            "at_last": [{"method": method_title(method), **both(
                "bounds", lambda m, method=method: m.bounds.loc[(last, method), "bound"],
                f"row ball={ball}, eps_attack={last:g}, method={method}, column bound (mean over certify's images)",
                "{:.2f}")} for method in methods],
            "radius": [{"method": method_title(method), **both(
                "radii", lambda m, method=method: m.radii.loc[(tau, method)],
                f"rows tau={tau}, method={method}: median of column radius", "{:.4f}")} for method in methods],
            "tau": src.q(tau, "{}", None, ""),
            "time": {**time,
                     "ratio": (src.q(time["ours"].value / time["twin"].value, "{:.1f}", None, "")
                               if devices[0] == devices[1] else None),
                     "devices": listing(dict.fromkeys(devices))},
        })
    return {"bound": bound, "page": src.link(page) if page else "", "last": src.q(last, "{:g}", None, ""),
            "models": out, "summary": summary_of(models, [m["word"] for m in out])}
