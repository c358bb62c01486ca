"""scripts/relock.py on a tiny-profile project whose pipeline is run and committed: a rename-only
refactor is re-locked, a one-ulp change in a bound is refused, a stage with changed params is not
eligible. One project copy serves every test; each test puts it back (git reset) when done."""

import importlib.util
import sys

import pytest

from conftest import ROOT, copy_project, run

pytestmark = pytest.mark.pipeline


def load_relock():
    spec = importlib.util.spec_from_file_location("relock", ROOT / "scripts" / "relock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


relock = load_relock()


@pytest.fixture(scope="module")
def committed(tmp_path_factory, env):
    """The tiny pipeline run as relock runs it (frozen clock: the timings it writes are 0 s, so
    relock's base copy finds every output up to date instead of running the pipeline again)."""
    repo = copy_project(tmp_path_factory.mktemp("relock-project"), env)
    clock = relock.write_clock(tmp_path_factory.mktemp("clock"))
    run(["dvc", "repro"], repo, relock.stage_env(repo, clock, env))
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "tiny results"], repo, env)
    return repo


@pytest.fixture
def repo(committed, env):
    yield committed
    run(["git", "reset", "-q", "--hard"], committed, env)


def edit(path, old, new):
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new))


def relock_in(repo, env, tmp_path, *args):
    return run([sys.executable, "scripts/relock.py", "--workdir", tmp_path, *args], repo, env, check=False)


def test_classify_takes_only_modified_code_deps(tmp_path):
    for name in ("pkg/__init__.py", "pkg/__pycache__/x.pyc", "templates/a.py", "templates/a.j2"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    eligible, other = relock.classify({
        "certify@m": [{"changed deps": {"provae/linear_bounds.py": "modified", "pkg": "modified"}}],
        "report@m": [{"changed deps": {"templates": "modified"}}],
        "evaluate@m": [{"changed deps": {"provae/bounds.py": "modified", "params.yaml": {"evaluate.apgd_steps": "modified"}}}],
        "train@m": [{"changed outs": {"models/m.pt": "modified"}}],
        "report": [{"changed deps": {"stages/report.py": "modified", "models": "modified"}}],
        "data@m": ["always changed"],
    }, tmp_path)
    assert eligible == {"certify@m": ["provae/linear_bounds.py", "pkg"]}  # a folder of modules is code
    assert other == {"report@m": "templates modified", "evaluate@m": "params changed: evaluate.apgd_steps", "train@m": "changed outs: models/m.pt modified",
                     "report": "models modified", "data@m": "always changed"}


def test_a_rename_is_relocked_and_leaves_dvc_status_clean(repo, env, tmp_path):
    edit(repo / "provae" / "linear_bounds.py", "_chunk_size", "_batch_chunk")  # only certify imports it
    result = relock_in(repo, env, tmp_path)
    print(result.stdout, result.stderr)
    assert result.returncode == 0
    assert "  certify@mnist-0.05-0: provae/linear_bounds.py" in result.stdout
    assert "certify@mnist-0.05-0: reports/certify/mnist-eps0.05-seed0 identical" in result.stdout
    assert "committed (dvc commit -f): certify@mnist-0.0-0 certify@mnist-0.05-0" in result.stdout
    assert "Data and pipelines are up to date" in run(["dvc", "status"], repo, env).stdout


def test_a_one_ulp_move_in_the_bound_is_refused_naming_the_output(repo, env, tmp_path):
    # The returned bound one float below itself; the gradient is unchanged (the step is detached).
    edit(repo / "provae" / "bounds.py",
         "    return -scale * reconstruction_upper_bound(box, decoded) - kl_upper_bound(mu, log_sigma)\n",
         "    bound = -scale * reconstruction_upper_bound(box, decoded) - kl_upper_bound(mu, log_sigma)\n"
         "    return bound + (torch.nextafter(bound, torch.full_like(bound, -math.inf)) - bound).detach()\n")
    result = relock_in(repo, env, tmp_path)
    print(result.stdout, result.stderr)
    assert result.returncode == 1
    assert "REFUSED: outputs moved on the tiny profile" in result.stderr
    assert "evaluate@mnist-0.05-0: reports/eval/mnist-eps0.05-seed0/per_example.npz: md5 " in result.stderr
    assert "nothing committed" in result.stderr
    assert run(["git", "status", "--porcelain", "dvc.lock"], repo, env).stdout == ""


def test_a_stage_whose_params_changed_is_not_eligible(repo, env, tmp_path):
    edit(repo / "provae" / "linear_bounds.py", "_chunk_size", "_batch_chunk")
    edit(repo / "params.yaml", "bisection_steps: 2", "bisection_steps: 3")
    result = relock_in(repo, env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "eligible: none" in result.stdout
    assert "  certify@mnist-0.05-0: params changed: certify" in result.stdout
    assert "nothing to re-lock" in result.stdout
    assert run(["git", "status", "--porcelain", "dvc.lock"], repo, env).stdout == ""
