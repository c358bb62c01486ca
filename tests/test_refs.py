"""Every git ref the documentation names exists in the repository a reader clones.

Only `main` is published: a branch, tag or experiment ref that lives on one machine leaves a
reader with `git show` and `dvc metrics diff` commands that fail. Earlier results are cited by a
commit of main's history instead.
"""

import re
import subprocess

import pytest

from conftest import ROOT

DOCUMENTS = ["README.md", *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "reports").glob("*.md")),
             *sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "reports").glob("*.j2"))]
ALWAYS_THERE = {"HEAD", "main", "workspace"}
PATTERNS = [
    r"git show ((?!-)[\w./-]+):",                                 # git show <ref>:<path>
    r"git (?:log|diff|checkout|switch) ((?!-)[\w./-]+)",
    r"dvc (?:params|metrics|plots) diff ((?!-)[\w./-]+)(?: ((?!-)[\w./-]+))?",
    r"(?:branch|tag) `([\w./-]+)`",
    r"commit `?([0-9a-f]{7,40})\b",
]


def named_refs(text: str) -> set[str]:
    refs = set()
    for pattern in PATTERNS:
        for match in re.finditer(pattern, text):
            refs.update(group for group in match.groups() if group)
    return refs - ALWAYS_THERE


def exists(ref: str) -> bool:
    return subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"], cwd=ROOT,
                          capture_output=True).returncode == 0


def test_the_patterns_find_refs_of_every_kind():
    text = ("git show sigma0-1-clipped:reports/table1.md; `dvc metrics diff main mnist-seeds`; the branch `x-y`; "
            "the tag `v1`; commit `565e4d3`; dvc params diff --all")
    assert named_refs(text) == {"sigma0-1-clipped", "mnist-seeds", "x-y", "v1", "565e4d3"}


@pytest.mark.parametrize("document", DOCUMENTS)
def test_every_ref_a_document_names_is_in_the_repository(document):
    missing = sorted(ref for ref in named_refs((ROOT / document).read_text()) if not exists(ref))
    assert not missing, f"{document} names refs a clone of main does not have: {missing}"
