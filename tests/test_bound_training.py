"""End to end: the tiny profile with one model of its grid on `bound_training.models`. `dvc repro` trains
it on the ELBO-level bound (`train_bound`), evaluates and certifies it (`evaluate_bound`,
`certify_bound`), and the report sets it beside its IBP-trained twin in reports/bound_training.md
(the tiny project of `conftest.listed_project`, shared with the other optional stages' tests).
"""

import json
import re

import pytest

from conftest import run

from provae.model import load_checkpoint

pytestmark = pytest.mark.pipeline


@pytest.fixture(scope="module")
def project(listed_project):
    repo, env, params, output = listed_project
    return repo, env, params["bound_training"]["bound"], output


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
