"""The summary metrics (reports/metrics.json): the numbers of the paper's Table 1 and Figure 3 as seed means,
nested {dataset: {eps_train_X: ...}} as the sigma0 = 1 grid's file was, so
`dvc metrics diff <rev> --targets reports/metrics.json` compares two grids model by model.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from provae.report.results import QUANTITIES, Results


def metric_key(name: str, value: float) -> str:
    return f"{name}_{value:g}".replace(".", "_")


def summary_metrics(results: Results) -> dict:
    """{dataset: {eps_train_X: ...}} of seed means: Table 1's quantities, the attacked ELBO per
    eps_attack in the headline ball, and the certificate audit's violations."""
    summary: dict = {}
    for dataset in results.datasets:
        for eps in results.eps_of(dataset):
            keys = results.keys(dataset, eps)
            attacked = pd.concat([results.curves[k][f"elbo_attacked_{results.headline}"] for k in keys], axis=1).mean(axis=1)
            summary.setdefault(dataset, {})[metric_key("eps_train", eps)] = {
                **{q: round(float(np.mean([results.metrics[k][q] for k in keys])), 3) for q in QUANTITIES},
                "attacked_elbo": {metric_key("eps_attack", a): round(float(v), 3) for a, v in attacked.items()},
                "audit_violations": int(sum(results.metrics[k]["violations"] for k in keys)),
            }
    return summary
