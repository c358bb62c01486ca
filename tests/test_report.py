"""The report's Table 1: the spread over seeds, and a dataset without paper values shown alone."""

import numpy as np
import pandas as pd

from provae.report.results import separated, show, spread
from provae.report.table1 import table1_markdown


def table_row(dataset: str, label: str, paper: float) -> dict:
    row = {"dataset": dataset, "data": label, "ball": "unclipped", "eps_train": 0.1, "seeds": 3,
           "elbo_move_last_epochs": 0.004}
    for key in ("lb_train", "lb_test", "elbo_test", "gap_test", "lb_test_clipped"):
        row.update({f"{key}_mean": -40.0, f"{key}_std": 0.5, f"{key}_min": -40.5, f"{key}_max": -39.5})
        row[f"{key}_paper"] = paper
    return row


def test_a_dataset_without_paper_values_gets_no_paper_column():
    table = pd.DataFrame([table_row("mnist", "MNIST", -54.49), table_row("fashion_mnist", "Fashion-MNIST", np.nan)])
    text = table1_markdown(table, paper_datasets={"mnist"})
    mnist, fashion = text.split("## Fashion-MNIST")
    assert "-40.00 ± 0.50 (-54.49)" in mnist
    assert "(nan)" not in fashion and "-40.00 ± 0.50 |" in fashion
    assert "yes (0.4%)" in fashion


def test_spread_and_separation_over_seeds():
    low, high = spread([-75.5, -67.4, -72.6]), spread([-49.1, -50.0, -48.7])
    assert show(low) == "-71.83 ± 4.10" and low["n"] == 3  # sample std (n - 1)
    assert separated(low, high) is True and separated(low, spread([-70.0, -60.0])) is False
    assert separated(spread([-75.5]), spread([-49.1])) is None  # one seed: nothing to judge against
    assert show(spread([-3.0])) == "-3.00"  # one seed: no spread to show
