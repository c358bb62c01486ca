"""The report: the paper's Table 1 and Figures 1-4 regenerated beside the paper's values, with the
spread over seeds, plus the attack-curve, attack-strength, attack-budget, certify and fixed-encoder
tables, the training-curve, attack-budget and certified-radius figures, reports/metrics.json, the
models trained on the ELBO-level bound beside their IBP-trained twins (bound_training.md) and the
index reports/README.md.

One module per artifact; `results` (the grid's outputs, read once, and the spread over seeds) and
`plotting` (palette, image strips, PNGs with provenance) are shared; `build.build_report` writes
them all. Nothing time-dependent is written, so a re-run is byte-identical. Library code: it reads
no params file (stages/report.py passes the params dict and every path).
"""
