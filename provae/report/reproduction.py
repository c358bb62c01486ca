"""reports/REPRODUCTION.md, the written analysis, rendered from a template (reports/REPRODUCTION.md.j2)
whose prose is typed by hand and whose every number, range, count and verdict word is a named
quantity computed from the committed outputs, linked to the file (and row or column) it comes from.
Reproduces no single paper figure: it sets the paper's claims (Table 1, Figures 2-4) beside ours.

Here: `Quantity` (a value, as printed, with its source), the spread and verdict rule in one function
(`compare`), the crossing of two curves, the template's digit check, and rendering. The quantities
themselves live beside the artifact each comes from (`*_quantities` in table1, attack_curves, ...).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2

from provae.report.results import separated

# Words and numbers a template's prose may carry outside placeholders: names, not measurements.
ALLOWED_DIGITS = (r"Figures? \d(-\d)?", r"Tables? \d", r"eq\. \d+", r"Claims? \d", r"\[0, 1\]", r"CIFAR-10", r"MD5",
                  r"l_inf", r"sigma0", r"v\d\b", r"\(20\d\d\)", r"CROWN-IBP", r"H200", r"\.j2")
# The grid before this one, cited by its commit on main (a fresh clone has it; branches and tags it may not).
EARLIER_GRID = {"commit": "565e4d3206e14034dfe503ac26b5b2337c4a9ce9",
                "setting": "sigma0 = 1, the ball clipped to [0, 1], fixed-step PGD"}
PLACEHOLDER = re.compile(r"\{\{.*?\}\}|\{%.*?%\}|\{#.*?#\}", re.DOTALL)


def shown(value, fmt: str) -> str:
    """``value`` in ``fmt``; a number of a hundred thousand or more (a vacuous bound, an exploded
    ELBO) in three significant digits instead of its last decimals."""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isfinite(value) and abs(value) >= 1e5 and fmt.endswith("f}"):
        return f"{value:{'+' if '+' in fmt else ''}.3g}"
    return fmt.format(value)


@dataclass(frozen=True)
class Quantity:
    """A number as the page prints it, and where it comes from: ``source`` (a file or folder,
    relative to the page) and ``where`` (its row and column)."""

    value: float | int | str
    text: str
    source: str
    where: str

    def __str__(self) -> str:
        return f"[{self.text}]({self.source} \"{self.where}\")" if self.source else self.text

    def __format__(self, spec: str) -> str:
        return str(self)


class Sources:
    """Makes quantities whose links are relative to the page's folder ``base``."""

    def __init__(self, base: Path):
        self.base = Path(base)

    def link(self, path) -> str:
        return Path(os.path.relpath(Path(path), self.base)).as_posix()

    def q(self, value, fmt: str, path, where: str) -> Quantity:
        return Quantity(value, shown(value, fmt), self.link(path) if path else "", where)

    def span(self, quantities: list[Quantity], fmt: str, unit: str = "") -> Quantity:
        """``low-high`` (``low to high`` when either is negative) over quantities: the extremes,
        each linked to its own source."""
        ordered = sorted(quantities, key=lambda q: q.value)
        low, high = ordered[0], ordered[-1]
        if shown(low.value, fmt) == shown(high.value, fmt):
            return Quantity(low.value, shown(low.value, fmt) + unit, low.source, low.where)
        joint = " to " if min(low.value, high.value) < 0 else "-"
        text = (f"[{shown(low.value, fmt)}]({low.source} \"{low.where}\"){joint}"
                f"[{shown(high.value, fmt)}]({high.source} \"{high.where}\"){unit}")
        return Quantity((low.value, high.value), text, "", "")


def listing(items) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [str(item) for item in items]
    if not items:
        return "none"
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class Comparison:
    """Ours against a reference: the word, the difference (ours - reference), and the spread's say."""

    word: str            # "above", "below" or "matches"
    difference: float
    beyond_spread: bool | None  # None: fewer than two seeds, no spread to judge against

    @property
    def spread_note(self) -> str:
        return {True: "beyond the seeds' spread", False: "within the seeds' spread",
                None: "one seed: no spread to judge against"}[self.beyond_spread]


def compare(ours: dict, reference: dict | float, tolerance: float = 0.0) -> Comparison:
    """The one spread and verdict rule. ``ours`` and ``reference``: spread dicts over seeds
    (`results.spread`), or a reference value without spread (the paper's). 'matches' when the
    means differ by at most ``tolerance``, else 'above' or 'below'. Beyond the spread: the seed
    ranges do not overlap (a bare value: it lies outside ours); only with two seeds or more."""
    if not isinstance(reference, dict):
        reference = {"mean": float(reference), "min": float(reference), "max": float(reference), "n": math.inf}
    difference = float(ours["mean"] - reference["mean"])
    word = "matches" if abs(difference) <= tolerance else ("above" if difference > 0 else "below")
    return Comparison(word, difference, separated(ours, reference))


def crossing(eps_attack: list[float], difference: list[float]) -> tuple[float | None, float | None]:
    """Where a curve ends up above another for good: (last eps where it is not above, first eps
    from which it stays above). (None, first) when it is above throughout; (last, None) when it
    is not above at the largest eps."""
    above = [d > 0 for d in difference]
    if not above[-1]:
        return eps_attack[-1], None
    start = len(above) - 1
    while start > 0 and above[start - 1]:
        start -= 1
    return (eps_attack[start - 1] if start > 0 else None), eps_attack[start]


def degree(ratio: float) -> str:
    """How much more one thing is than another, in words: a ratio of at least 2 is 'far more'."""
    if ratio >= 2:
        return "far more"
    if ratio >= 1.2:
        return "more"
    return "about as" if ratio > 1 / 1.2 else "less"


def claim_verdict(checks: list[bool]) -> str:
    return "reproduces" if all(checks) else ("partly" if any(checks) else "does not reproduce")


def hand_typed_numbers(template: str) -> list[str]:
    """Digits in the template's prose: outside placeholders, beyond the allow-list. Each is a
    number typed by hand, which would not follow the outputs."""
    prose = PLACEHOLDER.sub(" ", template)
    for allowed in ALLOWED_DIGITS:
        prose = re.sub(allowed, " ", prose)
    return [line.strip() for line in prose.splitlines() if re.search(r"\d", line)]


def render_reproduction(template_path: Path, context: dict) -> str:
    """The page; a hand-typed number in the template, or a name it uses that the context lacks, fails."""
    template_path = Path(template_path)
    typed = hand_typed_numbers(template_path.read_text())
    if typed:
        raise ValueError(f"{template_path} types numbers into its prose (make them quantities): {typed[:5]}")
    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(template_path.parent), undefined=jinja2.StrictUndefined,
                                     keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True, autoescape=False)
    return environment.get_template(template_path.name).render(**context)


def model_source(results, kind: str, dataset: str, eps: float, name: str = "") -> tuple[Path, str]:
    """A model's per-model file (its first seed's) and a note saying which seeds a mean is over."""
    keys = results.keys(dataset, eps)
    path = results.patterns.path(kind, *keys[0])
    seeds = [k[2] for k in keys]
    return (path / name if name else path), (f"mean over seeds {seeds}" if len(seeds) > 1 else f"seed {seeds[0]}")
