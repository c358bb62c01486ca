"""The fixed-encoder table (reports/fixed_encoder.md): no paper counterpart. How much of the attacked
ELBO's fall in Figure 3 needs no encoder: the attacks' fall beside the exact worst fall with the
encoder held at the clean input's code, and the one-step residual-sign attack's fall.
"""

from __future__ import annotations

import pandas as pd

from provae.grid import model_name
from provae.report.results import BALL_TITLES, BALLS, Results


def fixed_encoder_markdown(results: Results, shown_eps_attack=(0.05, 0.1, 0.2)) -> str:
    """Per model: the attacks' fall of the ELBO beside the fall with the encoder held fixed."""
    lines = ["# How much of the attacked ELBO's fall needs no encoder?", "",
             "Mean fall of the ELBO (nats) on `evaluate`'s attacked test images, mean over seeds. 'attacks': "
             "`evaluate`'s curve. 'fixed encoder': the worst input in the ball scored against the clean input's own "
             "latent code, exact; what a model whose encoder ignored the perturbation would lose. 'residual sign': "
             "the true ELBO at that input, a one-step attack (also one of APGD's starts).", ""]
    for dataset in results.datasets:
        for ball in BALLS:
            rows = []
            for eps in results.eps_of(dataset):
                table = results.per_model_csv("fixed_encoder", dataset, eps)
                table = table.query("ball == @ball").groupby("eps_attack").mean(numeric_only=True)
                row = {"model": model_name(eps)}
                for a in [a for a in table.index if a in shown_eps_attack]:
                    values = table.loc[a]
                    row[f"eps {a:g}: attacks / fixed encoder / residual sign"] = (
                        f"{values['attack_drop']:.2f} / {values['fixed_encoder_drop']:.2f} / {values['residual_sign_drop']:.2f}")
                rows.append(row)
            lines += [f"## {results.labels[dataset]}, {BALL_TITLES[ball]}", "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return "\n".join(lines)


def fixed_encoder_quantities(results: Results, src, reference_eps: float) -> dict:
    """REPRODUCTION.md's 'needs no encoder' paragraph: per dataset and ball (never mixed), the share
    of the attacks' fall that the fixed-encoder input-only term accounts for."""
    from provae.report.reproduction import model_source

    out = {}
    for dataset in results.datasets:
        robust = [e for e in results.eps_of(dataset) if e != 0]
        for ball in BALLS:
            tables = {}
            for e in results.eps_of(dataset):
                table = results.per_model_csv("fixed_encoder", dataset, e)
                tables[e] = table[table["ball"] == ball].groupby("eps_attack").mean(numeric_only=True)
            last = max(tables[0.0].index)

            def q(eps, a, column, fmt, value=None):
                path, note = model_source(results, "fixed_encoder", dataset, eps)
                shown = tables[eps].loc[a, column] if value is None else value
                return src.q(shown, fmt, path, f"row ball={ball}, eps_attack={a:g}, column {column}; {note}")

            moderate = [a for a in (reference_eps / 2, reference_eps) if a in tables[0.0].index]
            out.setdefault(dataset, {})[ball] = {
                "moderate": [src.q(a, "{:g}", None, "") for a in moderate], "last": src.q(last, "{:g}", None, ""),
                "robust_share": src.span([q(e, a, "share_fixed_encoder", "{:.0%}") for e in robust for a in moderate], "{:.0%}"),
                "vae_share": [q(0.0, a, "share_fixed_encoder", "{:.0%}") for a in moderate],
                "vae_share_last": q(0.0, last, "share_fixed_encoder", "{:.0%}"),
                "term_ref": [{"name": model_name(e), "value": q(e, reference_eps, "fixed_encoder_drop", "{:.1f}")}
                             for e in (0.0, robust[0], robust[-1])],
                "vae_attack_last": q(0.0, last, "attack_drop", "{:.1f}"),
                "vae_term_last": q(0.0, last, "fixed_encoder_drop", "{:.1f}"),
                "vae_excess_last": q(0.0, last, "attack_drop", "{:.0f}",
                                     tables[0.0].loc[last, "attack_drop"] - tables[0.0].loc[last, "fixed_encoder_drop"]),
                "term_grows": bool(all(tables[a_].loc[reference_eps, "fixed_encoder_drop"] <= tables[b_].loc[reference_eps, "fixed_encoder_drop"]
                                       for a_, b_ in zip(results.eps_of(dataset), results.eps_of(dataset)[1:]))),
            }
    return out
