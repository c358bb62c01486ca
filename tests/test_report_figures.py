"""The report's figures read at a glance: keys outside the axes, one colour-blind-safe palette with
the same colour per model everywhere, Figure 3's two questions in two rows, and the certified-radius
axes as wide as their curves (tests/report_fixture.py's small grid)."""

from __future__ import annotations

import numpy as np
import pytest
from matplotlib.colors import to_hex
from matplotlib.lines import Line2D
from report_fixture import make_inputs, params

from provae.grid import product
from provae.report import (attack_budget_figure, attack_curves, certified_radius, fig1_adversarial,
                           fig2_reconstructions, fig3_attack_curves, fig4_samples, plotting, training_curves)
from provae.report.attack_strength import strength_checks
from provae.report.results import Results


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return Results(make_inputs(tmp_path_factory.mktemp("inputs")), params())


@pytest.fixture
def drawn(monkeypatch, tmp_path):
    """Each figure function's figure, drawn, instead of saved."""
    figures = []

    def keep(fig, path, results, keys, what):
        fig.canvas.draw()
        figures.append(fig)
        return keys

    for module in (attack_budget_figure, certified_radius, fig1_adversarial, fig2_reconstructions, fig3_attack_curves,
                   fig4_samples, training_curves):
        monkeypatch.setattr(module, "save_figure", keep)
    return figures


def line_figures(results, path):
    fig3_attack_curves.figure_attack_curves(results, "unclipped", path / "fig3.png", strength_checks(results))
    certified_radius.figure_certified_radius(results, path / "radius.png")
    training_curves.figure_training_curves(results, 0, path / "training.png")


def overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_keys_sit_outside_every_axes_and_once_per_figure(results, drawn, tmp_path):
    line_figures(results, tmp_path)
    assert len(drawn) == 3
    for fig in drawn:
        assert all(ax.get_legend() is None for ax in fig.axes)  # no key inside a panel
        assert len(fig.legends) == 1
        key = fig.legends[0].get_window_extent()
        for ax in fig.axes:
            assert not overlaps(key, ax.get_window_extent()), fig.get_suptitle()
        for text in (fig.legends[0], fig._suptitle):  # nothing runs off the canvas
            extent = text.get_window_extent()
            assert 0 <= extent.x0 and extent.x1 <= fig.bbox.width, fig.get_suptitle()
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert labels.count("VAE") == 1 and labels.count("proVAE eps_train=0.1") == 1


def test_one_colour_blind_safe_palette_the_vae_black(results):
    colours = plotting.palette(results)
    assert list(colours) == [0.0, 0.1]
    assert colours[0.0] == "#000000" and set(colours.values()) <= set(plotting.OKABE_ITO)
    assert len(set(plotting.OKABE_ITO)) == len(plotting.OKABE_ITO)


def test_every_line_has_its_models_colour(results, drawn, tmp_path):
    line_figures(results, tmp_path)
    allowed = {to_hex(c) for c in plotting.palette(results).values()} | {"#595959"}  # the key's grey style samples
    for fig in drawn:
        for ax in fig.axes:
            for line in ax.get_lines():
                if line.get_xdata() is not None and len(line.get_xdata()) > 2:
                    assert to_hex(line.get_color()) in allowed, fig.get_suptitle()


def test_image_figures_mark_each_model_with_its_colour(results, drawn, tmp_path):
    fig1_adversarial.figure_adversarial_examples(results, "mnist", [0.0, 0.1], 0, 0.1, tmp_path / "a.png")
    fig4_samples.figure_samples(results, "mnist", 0, tmp_path / "b.png")
    colours = plotting.palette(results)
    for fig in drawn:
        bars = [to_hex(p.get_facecolor()) for ax in fig.axes for p in ax.patches]
        assert bars == [to_hex(colours[0.0]), to_hex(colours[0.1])]


def test_figure_3_has_an_attack_row_and_a_bound_row(results, drawn, tmp_path):
    fig3_attack_curves.figure_attack_curves(results, "clipped", tmp_path / "fig3.png", strength_checks(results))
    fig = drawn[0]
    top, bottom = fig.axes
    assert "ELBO under attack" in top.get_title() and "certified lower bound" in bottom.get_title()
    assert "ball clipped" in fig.get_suptitle()
    # attacks: one line per model (no check beat the clipped curve: no hollow markers); bounds: the
    # faint attacked ELBO plus IBP and the relaxation per model
    assert len(top.get_lines()) == 2 and len(bottom.get_lines()) == 2 * 3
    assert "upper bound (a check beat it)" not in [t.get_text() for t in fig.legends[0].get_texts()]
    assert {line.get_linestyle() for line in bottom.get_lines()} == {"-", "--", ":"}
    low, high = bottom.get_ylim()
    bounds = fig3_attack_curves.certified_bounds(results, "mnist", 0.0, "clipped")
    if bounds[["ibp", "crown"]].to_numpy().min() < low:  # vacuous bounds are cut, and the title says so
        assert "axis cut at" in bottom.get_title()


def test_certified_fraction_by_hand():
    radii = np.array([0.0, 0.01, 0.02, 0.02])
    assert certified_radius.certified_fraction(radii, [0.0, 0.005, 0.01, 0.02, 0.03]).tolist() == [1.0, 0.75, 0.75, 0.5, 0.0]


def test_certified_radius_axes_end_where_their_curves_do(results, drawn, tmp_path):
    import pandas as pd
    certified_radius.figure_certified_radius(results, tmp_path / "radius.png")
    table = pd.concat([pd.read_csv(results.patterns.path("certify", *k) / "radii.csv") for k in results.keys()])
    taus = list(dict.fromkeys(table["tau"]))
    for ax, tau in zip(drawn[0].axes, taus):
        largest = table[table["tau"] == tau]["radius"].max()
        assert ax.get_xlim() == (0.0, pytest.approx(certified_radius.panel_limit(table[table["tau"] == tau]["radius"])))
        assert ax.get_xlim()[1] <= 1.08 * max(largest, 2 / 255) + 1e-12


def test_the_key_is_never_wider_than_its_figure():
    """Five models and five long line styles (Figure 3 with every certify method and an upper bound)
    on a narrow figure: the key wraps into shorter rows instead of running off the canvas."""
    fig, axes = plotting.new_figure(1, 2, (8, 3))
    models = [Line2D([], [], label=f"proVAE eps_train={eps}") for eps in (0.01, 0.02, 0.05, 0.1, 0.2)]
    styles = plotting.style_handles(["attacked", "upper_bound", "ibp", "crown", "elbo"])
    plotting.shared_legend(fig, models, styles)
    fig.canvas.draw()
    assert len(fig.legends) == 1
    key = fig.legends[0].get_window_extent()
    assert 0 <= key.x0 and key.x1 <= fig.bbox.width
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert all(h.get_label() in labels for h in models + styles)
    # a key that fits keeps the colours in one row (as many columns as models, plus the row label)
    plotting.plt.close(fig)
    fig, _ = plotting.new_figure(1, 2, (12, 3))
    plotting.shared_legend(fig, models[:2], styles[:2])
    assert fig.legends[0]._ncols == 3
    plotting.plt.close(fig)


def test_figure_3_and_the_curve_table_say_how_many_seeds_each_model_has(tmp_path, drawn):
    ragged = params()
    ragged["grid"] = {k: v for k, v in ragged["grid"].items() if not (v["eps"] == 0.1 and v["seed"] == 1)}
    ragged["attack_strength"]["models"] = product(["mnist"], [0.1], [0])
    uneven = Results(make_inputs(tmp_path / "inputs"), ragged)
    assert fig3_attack_curves.seed_counts(uneven, "mnist") == "seeds per model (eps_train 0 / 0.1): 2 / 1"
    fig3_attack_curves.figure_attack_curves(uneven, "unclipped", tmp_path / "fig3.png", strength_checks(uneven))
    assert drawn[0].axes[0].get_title().endswith("seeds per model (eps_train 0 / 0.1): 2 / 1")
    plotting.plt.close(drawn[0])
    rows = attack_curves.attack_curve_markdown(uneven, strength_checks(uneven)).split("## MNIST, ball clipped")[0]
    assert next(r for r in rows.splitlines() if r.startswith("| VAE ")).split("|")[2].strip() == "0, 1"
    assert next(r for r in rows.splitlines() if r.startswith("| proVAE eps_train=0.1 ")).split("|")[2].strip() == "0"
    even = Results(make_inputs(tmp_path / "even"), params())
    assert fig3_attack_curves.seed_counts(even, "mnist") == "2 seeds per model"
