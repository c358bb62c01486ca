"""End to end: the tiny profile with one model of its grid on `bound_training.models`. `dvc repro` trains
it on the ELBO-level bound (`train_bound`), evaluates and certifies it (`evaluate_bound`,
`certify_bound`), and the report sets it beside its IBP-trained twin in reports/bound_training.md.

The report stage's lines for that page (`REPORT_LINES`) are added to the copy's dvc.yaml when it
lacks them: they are what dvc.yaml's report stage needs (cmd, params, outs).
"""

import json
import re

import pytest
import yaml

from conftest import copy_project, run

from provae.model import load_checkpoint

pytestmark = pytest.mark.pipeline

MODEL = {"mnist-0.05-0": {"dataset": "mnist", "eps": 0.05, "seed": 0}}
# (the line of the report stage they follow, the lines to add after it)
REPORT_LINES = [
    ("      --reproduction reports/REPRODUCTION.md --reproduction-template reports/REPRODUCTION.md.j2\n",
     "      --bound-training-table reports/bound_training.md\n"
     "      --bound-models 'models/{dataset}/{bound}-eps{eps}-seed{seed}.pt'\n"
     "      --bound-eval 'reports/eval/{dataset}-{bound}-eps{eps}-seed{seed}'\n"
     "      --bound-metrics 'reports/metrics/{dataset}-{bound}-eps{eps}-seed{seed}.json'\n"
     "      --bound-curves 'reports/attack_curves/{dataset}-{bound}-eps{eps}-seed{seed}.csv'\n"
     "      --bound-certify 'reports/certify/{dataset}-{bound}-eps{eps}-seed{seed}'\n"),
    ("      - report\n", "      - bound_training\n"),
    ("      - reports/metrics.json:\n          cache: false\n", "      - reports/bound_training.md:\n          cache: false\n"),
]


def with_report_lines(text: str) -> str:
    """dvc.yaml with `REPORT_LINES` in its report stage, unless it has them already."""
    if "--bound-training-table" in text:
        return text
    head, report = text.split("\n  report:\n")
    for anchor, lines in REPORT_LINES:
        assert report.count(anchor) == 1, anchor
        report = report.replace(anchor, anchor + lines)
    return head + "\n  report:\n" + report


@pytest.fixture(scope="module")
def project(tmp_path_factory, env):
    env = {**env, "OMP_NUM_THREADS": "1"}  # faster on 2 cores (README, "Scale-out")
    repo = copy_project(tmp_path_factory.mktemp("bound_training"), env)
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["bound_training"]["models"] = MODEL
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / "dvc.yaml").write_text(with_report_lines((repo / "dvc.yaml").read_text()))
    result = run(["dvc", "repro"], repo, env)
    return repo, env, params["bound_training"]["bound"], result.stdout


def test_repro_trains_evaluates_and_certifies_it_and_the_page_sets_it_beside_its_twin(project):
    repo, _, bound, output = project
    ran = re.findall(r"Running stage '([^']+)'", output)
    assert {f"{stage}@mnist-0.05-0" for stage in ("train_bound", "evaluate_bound", "certify_bound")} | {"report"} <= set(ran)
    assert load_checkpoint(repo / "models" / "mnist" / f"{bound}-eps0.05-seed0.pt").metadata["bound"] == bound
    page = (repo / "reports" / "bound_training.md").read_text()
    # the dataset's label depends on the mirror (genuine MNIST, or the generated one of a fresh clone)
    assert re.search(r"^## MNIST[^,\n]*, proVAE eps_train=0.05, seed 0$", page, re.M) and "## Verdict" in page
    row = next(line for line in page.splitlines() if line.startswith("| clean test ELBO |"))
    for name in ("mnist-eps0.05-seed0", f"mnist-{bound}-eps0.05-seed0"):
        elbo = json.loads((repo / "reports" / "metrics" / f"{name}.json").read_text())["elbo_test"]
        assert f"[{elbo:.2f}](metrics/{name}.json \"key elbo_test\")" in row
    assert "[bound_training.md](bound_training.md)" in (repo / "reports" / "README.md").read_text()


def test_status_is_clean_after_repro(project):
    repo, env, _, _ = project
    assert json.loads(run(["dvc", "status", "--json"], repo, env).stdout) == {}
