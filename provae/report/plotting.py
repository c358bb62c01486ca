"""Shared plotting helpers of the report's figures (the paper's Figures 1-4, the training curves and
the certified radius): one colour-blind-safe palette (Okabe-Ito) keyed by eps_train, so a model has
the same colour and place in every figure; line styles that say what a line is (attacked ELBO, IBP
bound, linear-relaxation bound, ELBO relaxation; any other certify method gets a style of its own
in `method_styles`), explained once per figure in a shared key outside the axes; image strips; and
`save_figure`, which writes a PNG with its provenance chunks (`index.png_provenance`) and nothing
time-dependent.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from torchvision.utils import make_grid  # noqa: E402

from provae.grid import model_name  # noqa: E402
from provae.report.index import png_provenance  # noqa: E402
from provae.report.results import Results  # noqa: E402

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision
# deficiency. Black for the VAE; yellow last (it is faint on white).
OKABE_ITO = ("#000000", "#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442")
LINE_STYLES = {
    "attacked": {"linestyle": "-", "marker": "o", "markersize": 3.5, "label": "ELBO under attack"},
    "ibp": {"linestyle": "--", "label": "certified bound: IBP"},
    "crown": {"linestyle": ":", "label": "certified bound: CROWN"},
    "elbo": {"linestyle": "-.", "label": "certified bound: ELBO relaxation"},
    # A point the attack-strength check beat (Figure 3) or whose 4x-steps rung falls beyond the tolerance
    # (the attack-budget figure): the attacked ELBO there is only an upper bound.
    "upper_bound": {"linestyle": "none", "marker": "o", "markersize": 7, "markerfacecolor": "white",
                    "markeredgewidth": 1.4, "label": "upper bound (a check beat it)"},
    "train_bound": {"linestyle": "-", "marker": ".", "markersize": 4, "label": "certified bound at eps_train (LB)"},
    "train_elbo": {"linestyle": "--", "label": "ELBO"},
}
METHOD_TITLES = {"ibp": "IBP", "crown": "linear relaxation (CROWN)", "elbo": "ELBO relaxation"}
# Certify methods without a style of their own, in the order they appear: dash-dot-dot, then loose dashes.
SPARE_DASHES = ((0, (5, 1.5, 1, 1.5, 1, 1.5)), (0, (6, 3)), (0, (1, 1)))
LEGEND_SIZE = 8


def method_title(method: str) -> str:
    return METHOD_TITLES.get(method, method)


def method_styles(methods) -> dict:
    """Certify method -> its line style (with the key's label): IBP dashed, CROWN dotted, the ELBO
    relaxation dash-dot; a method without a style of its own gets a spare dash pattern."""
    spare = iter(SPARE_DASHES * len(methods))
    return {m: LINE_STYLES[m] if m in METHOD_TITLES else {"linestyle": next(spare), "label": f"certified bound: {m}"}
            for m in methods}


def palette(results: Results) -> dict:
    """eps_train -> colour, in eps order (the VAE first, black): the same in every figure."""
    colours = OKABE_ITO * (len(results.eps_grid) // len(OKABE_ITO) + 1)
    return dict(zip(results.eps_grid, colours))


def line_width(eps: float) -> float:
    """The VAE, the baseline every robust model is read against, drawn heavier."""
    return 2.4 if eps == 0 else 1.6


def model_handles(results: Results, eps_values) -> list:
    colours = palette(results)
    return [Line2D([], [], color=colours[eps], linewidth=line_width(eps), label=model_name(eps)) for eps in eps_values]


def style_handles(kinds) -> list:
    """Grey samples of each line style, for the key: what a line is, whatever its model. A kind is
    a name of LINE_STYLES or a style dict with its label (`method_styles`)."""
    return [Line2D([], [], color="0.35", linewidth=1.4, **(LINE_STYLES[kind] if isinstance(kind, str) else kind))
            for kind in kinds]


def shared_legend(fig, models: list, styles: list = (), colour_label: str = "colour: model") -> None:
    """One key for the whole figure, below the axes: rows of the colours (the models', or what
    ``colour_label`` names), then rows of the line styles, each row at most as long as the colours'
    (at least three). Where that key would be wider than the figure (matplotlib lets an outside key
    run off the canvas), the rows are shortened until it fits, down to two entries."""
    for per_row in range(max(len(models), 3), 1, -1):
        legend = legend_in_rows(fig, models, styles, colour_label, per_row)
        if legend.get_window_extent(fig.canvas.get_renderer()).width <= fig.bbox.width or per_row == 2:
            return
        legend.remove()


def legend_in_rows(fig, models: list, styles: list, colour_label: str, per_row: int):
    """The key with ``per_row`` entries a row, each row led by what its entries are (matplotlib fills
    a legend column by column, hence the interleaving)."""
    def rows_of(entries, label):
        chunks = [list(entries[i:i + per_row]) for i in range(0, len(entries), per_row)]
        return [[Line2D([], [], linestyle="none", label=label if i == 0 else " "), *chunk]
                for i, chunk in enumerate(chunks)]

    rows = rows_of(models, colour_label) + rows_of(styles, "style: line")
    columns = max(map(len, rows))
    blank = Line2D([], [], linestyle="none", label=" ")
    rows = [row + [blank] * (columns - len(row)) for row in rows]
    handles = [row[c] for c in range(columns) for row in rows]
    return fig.legend(handles=handles, loc="outside lower center", ncol=columns, fontsize=LEGEND_SIZE, frameon=False,
                      handlelength=3.0, handletextpad=0.5, columnspacing=1.6)


def figure_title(fig, text: str) -> None:
    """The figure's title, wrapped at the figure's edge (matplotlib lets a long one run off the canvas)."""
    fig.suptitle(text, fontsize=10, wrap=True)


def new_figure(nrows: int, ncols: int, figsize, **kwargs):
    """A figure with constrained layout: keys outside the axes get their own room."""
    return plt.subplots(nrows, ncols, figsize=figsize, squeeze=False, layout="constrained", **kwargs)


def save_figure(fig, path: Path, results: Results, keys: list, what: str) -> list:
    """PNG with its provenance in text chunks: the models (checkpoint md5) and the params. Returns ``keys``."""
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(path, dpi=120, metadata=png_provenance(results, keys, what, path))
    plt.close(fig)
    return keys


def image_strip(images: np.ndarray, nrow: int) -> np.ndarray:
    """uint8 [N, C, H, W] -> one HWC image, tiles separated by a 2-pixel border."""
    grid = make_grid(torch.from_numpy(images), nrow=nrow, padding=2, pad_value=255)
    return grid.permute(1, 2, 0).numpy()


def show_images(ax, images: np.ndarray, nrow: int, title: str, colour=None) -> None:
    """Images as one strip; ``colour``: the model's, as a bar beside the strip (its key in the line figures)."""
    strip = image_strip(images, nrow)
    ax.imshow(strip.squeeze(-1) if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=255)
    ax.set_title(title, fontsize=9, loc="left")
    ax.axis("off")
    if colour is not None:
        ax.add_patch(Rectangle((-0.018, 0.0), 0.009, 1.0, transform=ax.transAxes, color=colour, clip_on=False))
