"""Linear relaxation bounds (CROWN, CROWN-IBP): a certificate of the ELBO tighter than IBP.

IBP (:mod:`provae.interval`) bounds every layer by a box. Here every neuron is bounded by two
*linear functions* of the network's input instead: affine layers map them exactly, each ReLU is
relaxed by two lines, and a linear function is minimised over the input box in closed form
(Zhang et al. 2018, "Efficient neural network robustness certification with general activation
functions", CROWN: Theorem 3.2, and Corollary 3.3 for the closed form). The ReLU relaxations need
pre-activation bounds; ``intermediate`` picks where they come from:

- ``"ibp"``: IBP's boxes (CROWN-IBP: Zhang et al. 2020, "Towards stable and efficient training
  of verifiably robust neural networks");
- ``"crown"`` (default): linear bounds of each pre-activation layer in turn, each clamped into
  IBP's box (full CROWN); IBP is rerun from the tightened layer, so later boxes shrink too. Only
  neurons IBP leaves unstable are bounded (a stable neuron's relaxation is exact anyway).

The linear functions can be carried in either direction; the cost grows with their number:

- ``"backward"`` (back-substitution, CROWN's own order): one linear function of the input per
  *output* bounded, pulled from the output back to the input. The encoder's way: an image in,
  100 numbers (mu and log sigma) out.
- ``"forward"``: for every neuron, a lower and an upper linear function of the *input*, pushed
  layer by layer (the forward mode of linear relaxation, Xu et al. 2020, "Automatic perturbation
  analysis for scalable certified robustness and beyond"). The decoder's way: 50 latent numbers
  in, 784 or 3072 pixels out; its intermediate bounds come almost for free.

``"auto"`` picks the direction with fewer functions to carry. (Backward from every decoder pixel
was measured too: 10-50x the time, and no tighter on robustly trained models; tighter only where
every method's bound is vacuous. ``benchmarks/bound_methods.py --decoder-backward`` repeats it.)
Every bound, intermediate or final, is clamped into IBP's box: it stays sound and is never looser
than IBP (Zhang et al. 2020 found linear bounds can be looser on IBP-trained networks).

The relaxed networks themselves (:class:`RelaxedNetwork` from :func:`encoder_relaxation` and
:func:`decoder_relaxation`, and :func:`back_substitute_lower` through them) serve specifications
other than a box: ``provae.elbo_relaxation`` bounds the ELBO itself with them.

ReLU relaxation, for pre-activation bounds l < 0 < u: upper line through (l, 0) and (u, u);
lower line y = x if u >= -l, else y = 0 (CROWN's adaptive choice, "CROWN-Ada" in Zhang et al.
2018). Stable neurons are exact (identity or zero). A Sigmoid (monotone) is allowed only at the
network's output, where it maps the bounds of its input. Any other layer raises ``TypeError``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bounds import (
    _check_noise,
    _log_likelihood_scale,
    input_box,
    kl_upper_bound,
    latent_box,
    reconstruction_upper_bound,
)
from .interval import Interval, overflow_to_vacuous, propagate
from .model import VAE

INTERMEDIATE = ("ibp", "crown")
DIRECTIONS = ("auto", "backward", "forward")
DEFAULT_INTERMEDIATE = "crown"

# Working memory a call may use for its linear coefficients (the peak is a small multiple of
# what one chunk's coefficient tensors take; chunks are sized by the estimate below).
MEMORY_BUDGET_BYTES = 2 << 30
_LIVE_COPIES = 12  # coefficient-sized tensors alive at once in one step (both bounds, their parts, products)


# --- ReLU relaxation -------------------------------------------------------------------------


@dataclass(frozen=True)
class Relaxation:
    """``lower_slope * y <= relu(y) <= upper_slope * y + upper_intercept`` for y in [l, u]."""

    lower_slope: Tensor
    upper_slope: Tensor
    upper_intercept: Tensor


def relu_relaxation(pre: Interval) -> Relaxation:
    """CROWN's adaptive ReLU relaxation (Zhang et al. 2018, "CROWN-Ada").

    Unstable (l < 0 < u): upper line through (l, 0) and (u, u): slope u / (u - l), intercept
    -l u / (u - l); lower slope 1 if u >= -l, else 0 (the one of the two with less area).
    Active (l >= 0): both lines are y. Inactive (u <= 0): both are 0.

    The intercept is -l u / (u - l) as written wherever the product -l u is finite. Where it
    overflows float32 (|l| u above ~3e38) it is max(-l s, (1 - s) u) for the computed slope s
    instead: the same number in exact arithmetic, without the overflow (an infinite intercept
    makes 0 * inf = NaN in back-substitution), and sound for any s in [0, 1] (the line is above
    relu at both ends, so above it between them), even where u - l itself overflows and s = 0.
    """
    lower, upper = pre.lower, pre.upper
    unstable = (lower < 0) & (upper > 0)
    active = lower >= 0
    width = torch.where(unstable, upper - lower, torch.ones_like(upper))
    upper_slope = torch.where(unstable, upper / width, active.to(upper.dtype))
    product = -lower * upper
    # fmax: with l = -inf, -l s is inf * 0 = NaN, and the line is y = u, the other candidate.
    overflowed = torch.fmax(-lower * upper_slope, (1 - upper_slope) * upper)
    intercept = torch.where(torch.isfinite(product), product / width, overflowed)
    upper_intercept = torch.where(unstable, intercept, torch.zeros_like(upper))
    lower_slope = torch.where(unstable, (upper >= -lower).to(upper.dtype), active.to(upper.dtype))
    return Relaxation(lower_slope, upper_slope, upper_intercept)


def tighten(ibp: Interval, lower: Tensor, upper: Tensor) -> Interval:
    """Linear bounds clamped into IBP's box: sound (both contain the values) and never looser.

    Clamping (rather than max/min alone) also keeps lower <= upper, and gives IBP's exact
    point back when the box is a point (eps = 0), whatever the rounding of the linear bounds.
    A NaN linear bound (0 * inf or inf - inf once some box is infinite) says nothing: IBP's end
    is kept there (torch.maximum would spread the NaN into every later bound).
    """
    lower = torch.where(torch.isnan(lower), ibp.lower, lower)
    upper = torch.where(torch.isnan(upper), ibp.upper, upper)
    return Interval(
        torch.minimum(torch.maximum(lower, ibp.lower), ibp.upper),
        torch.maximum(torch.minimum(upper, ibp.upper), ibp.lower),
    )


# --- Layers --------------------------------------------------------------------------------


def _conv_transpose(layer: nn.ConvTranspose2d, inp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return F.conv_transpose2d(
        inp, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
    )


# Forward application of each affine layer with a given weight (W, |W|/2, ...) and bias.
_APPLY: dict[type, Callable[[nn.Module, Tensor, Tensor, Tensor | None], Tensor]] = {
    nn.Linear: lambda layer, inp, weight, bias: F.linear(inp, weight, bias),
    nn.Conv2d: lambda layer, inp, weight, bias: layer._conv_forward(inp, weight, bias),
    nn.ConvTranspose2d: _conv_transpose,
}
_RESHAPES = (nn.Flatten, nn.Unflatten)
_SUPPORTED = (*_APPLY, *_RESHAPES, nn.ReLU)


def _check_supported(layer: nn.Module) -> None:
    kind = type(layer)
    if kind not in _SUPPORTED:
        names = ", ".join(sorted(t.__name__ for t in (*_SUPPORTED, nn.Sigmoid, nn.Sequential)))
        raise TypeError(f"no linear relaxation rule for layer {kind.__name__}; supported: {names}")
    if kind in (nn.Conv2d, nn.ConvTranspose2d) and (layer.padding_mode != "zeros" or isinstance(layer.padding, str)):
        raise TypeError(f"{kind.__name__} is bounded only with numeric zero padding, got {layer.padding!r}, "
                        f"padding_mode {layer.padding_mode!r}")


def _split_layers(layers: nn.Module | Sequence[nn.Module]) -> tuple[list[nn.Module], list[nn.Module]]:
    """The network's layers (nested Sequentials opened) and its trailing Sigmoids, apart."""
    flat: list[nn.Module] = []

    def walk(modules) -> None:
        for module in modules:
            if type(module) is nn.Sequential:
                walk(module)
            else:
                flat.append(module)

    walk([layers] if isinstance(layers, nn.Module) else layers)
    body_end = len(flat)
    while body_end and type(flat[body_end - 1]) is nn.Sigmoid:
        body_end -= 1
    for position, layer in enumerate(flat[:body_end]):
        if type(layer) is nn.Sigmoid:
            raise TypeError(f"Sigmoid at position {position} is not the output: it is bounded only at the network's end")
        _check_supported(layer)
    return flat[:body_end], flat[body_end:]


def _needs_refinement(prefix: Sequence[nn.Module]) -> bool:
    """A single affine layer of the input box is bounded exactly by IBP: nothing to gain there."""
    return any(type(layer) is nn.ReLU for layer in prefix) or sum(type(layer) in _APPLY for layer in prefix) > 1


def _spec_interval(spec: tuple[Tensor, Tensor], x: Interval) -> Interval:
    """IBP of the final linear map ``W f + b`` (center/radius form, as provae.interval)."""
    weight, bias = spec
    flat = Interval(x.lower.flatten(1), x.upper.flatten(1))
    center = F.linear(flat.center, weight, bias)
    radius = F.linear(flat.radius, weight.abs())
    return overflow_to_vacuous(center - radius, center + radius)


def _chunk_size(per_item_bytes: int) -> int:
    return max(1, MEMORY_BUDGET_BYTES // (_LIVE_COPIES * max(1, per_item_bytes)))


# --- Backward: back-substitution (CROWN, Zhang et al. 2018, Theorem 3.2) ---------------------


def _channels_last(t: Tensor) -> Tensor:
    """Many coefficient maps in one convolution run faster channels-last on the CPU (about 1.5-2x here)."""
    return t.contiguous(memory_format=torch.channels_last)


def _back_affine(layer: nn.Module, a: Tensor, in_shape: torch.Size) -> tuple[Tensor, Tensor | None]:
    """``a . layer(v) = a' . v + c``: the coefficients on the layer's input, and c. a: [N, *out]."""
    kind = type(layer)
    if kind in _RESHAPES:
        return a.reshape(a.shape[0], *in_shape), None
    weight, bias = layer.weight, layer.bias
    if kind is nn.Linear:
        back = a @ weight
    elif kind is nn.Conv2d:
        # The adjoint of a convolution is the transposed convolution with the same weight;
        # output_padding restores input rows the stride skipped over.
        natural = [(o - 1) * s - 2 * p + d * (k - 1) + 1 for o, s, p, d, k in
                   zip(a.shape[-2:], layer.stride, layer.padding, layer.dilation, layer.kernel_size)]
        output_padding = tuple(i - n for i, n in zip(in_shape[-2:], natural))
        back = F.conv_transpose2d(_channels_last(a), weight, None, layer.stride, layer.padding, output_padding,
                                  layer.groups, layer.dilation)
    else:  # ConvTranspose2d: its adjoint is the convolution with the same weight
        back = F.conv2d(_channels_last(a), weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if tuple(back.shape[1:]) != tuple(in_shape):
        raise ValueError(f"back-substitution through {layer} gave shape {tuple(back.shape[1:])}, "
                         f"expected {tuple(in_shape)}")
    if bias is None:
        return back, None
    per_output = a if kind is nn.Linear else a.sum(dim=(2, 3))  # [N, out features or channels]
    return back, per_output @ bias


def _relu_rule(lower_slope: Tensor, upper_slope: Tensor, intercept: Tensor, lo: tuple[Tensor, Tensor],
               hi: tuple[Tensor, Tensor], dims: tuple[int, ...]):
    """Back through a ReLU (Zhang et al. 2018, Theorem 3.2): for the lower bound, positive
    coefficients take the lower line and negative ones the upper line (its intercept joins the
    constant); the upper bound swaps them. ``dims``: the neuron dimensions, summed for the constant."""

    def split(a: Tensor) -> tuple[Tensor, Tensor]:
        positive = a.clamp(min=0)
        return positive, a - positive

    (a_lo, c_lo), (a_hi, c_hi) = lo, hi
    pos_lo, neg_lo = split(a_lo)
    pos_hi, neg_hi = (pos_lo, neg_lo) if a_hi is a_lo else split(a_hi)
    new_lo = (pos_lo * lower_slope + neg_lo * upper_slope, c_lo + (neg_lo * intercept).sum(dim=dims))
    new_hi = (pos_hi * upper_slope + neg_hi * lower_slope, c_hi + (pos_hi * intercept).sum(dim=dims))
    return new_lo, new_hi


def _back_relu(relaxation: Relaxation, rows: Tensor, lo: tuple[Tensor, Tensor], hi: tuple[Tensor, Tensor]):
    """:func:`_relu_rule` on coefficients [G, M, *shape], the relaxation gathered at each group's example."""
    slopes = (t[rows].unsqueeze(1) for t in (relaxation.lower_slope, relaxation.upper_slope, relaxation.upper_intercept))
    return _relu_rule(*slopes, lo, hi, dims=tuple(range(2, lo[0].dim())))


def _concretize(a: Tensor, c: Tensor, box: Interval, rows: Tensor, sign: int) -> Tensor:
    """min (sign -1) or max (sign +1) of ``a . x + c`` over x in box[rows]: a.center +- |a|.radius
    (Zhang et al. 2018, Corollary 3.3, for a box). a: [G, M, *in], c: [G, M] -> [G, M]."""
    center = box.center[rows].flatten(1).unsqueeze(2)  # [G, D, 1]
    radius = box.radius[rows].flatten(1).unsqueeze(2)
    flat = a.flatten(2)  # [G, M, D]
    return c + torch.bmm(flat, center).squeeze(2) + sign * torch.bmm(flat.abs(), radius).squeeze(2)


def _back_substitute(
    layers: Sequence[nn.Module], shapes: Sequence[torch.Size], relaxations: dict[int, Relaxation],
    box: Interval, weight: Tensor, bias: Tensor, rows: Tensor, cols: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of ``weight[j] . f(x) + bias[j]`` for x in box (f = the layers).

    ``weight`` [m, *output shape], ``bias`` [m]. With ``cols`` None: every j for every example
    ``rows`` -> [len(rows), m]. Otherwise pairs: j = cols[i] for example rows[i] -> [len(rows), 1].
    """
    # Affine and reshape layers after the last ReLU do not depend on the example: pass the
    # m coefficient rows through them once, before splitting by example.
    position = len(layers)
    a, c = weight, bias
    while position and type(layers[position - 1]) is not nn.ReLU:
        position -= 1
        a, extra = _back_affine(layers[position], a, shapes[position])
        c = c if extra is None else c + extra
    per_group = (a.shape[0] if cols is None else 1) * max(math.prod(s) for s in shapes[: position + 1])
    chunk = _chunk_size(per_group * a.element_size())
    lowers, uppers = [], []
    for start in range(0, len(rows), chunk):
        r = rows[start : start + chunk]
        if cols is None:
            a_g, c_g = a.unsqueeze(0).expand(len(r), *a.shape), c.unsqueeze(0).expand(len(r), -1)
        else:
            k = cols[start : start + chunk]
            a_g, c_g = a[k].unsqueeze(1), c[k].unsqueeze(1)
        lo, hi = (a_g, c_g), (a_g, c_g)
        for p in range(position - 1, -1, -1):
            layer = layers[p]
            if type(layer) is nn.ReLU:
                lo, hi = _back_relu(relaxations[p], r, lo, hi)
                continue
            same = hi[0] is lo[0]
            new = []
            for a_b, c_b in (lo,) if same else (lo, hi):
                groups, specs = a_b.shape[:2]
                back, extra = _back_affine(layer, a_b.reshape(groups * specs, *a_b.shape[2:]), shapes[p])
                back = back.view(groups, specs, *back.shape[1:])
                new.append((back, c_b if extra is None else c_b + extra.view(groups, specs)))
            lo, hi = (new[0], new[0]) if same else tuple(new)
        lowers.append(_concretize(*lo, box, r, -1))
        uppers.append(_concretize(*hi, box, r, +1))
    return torch.cat(lowers), torch.cat(uppers)


def _refine_backward(prefix, shapes, relaxations, box: Interval, pre: Interval) -> Interval:
    """Pre-activation bounds by back-substitution (full CROWN), for the neurons IBP leaves
    unstable (a stable neuron's relaxation is exact whatever its bounds), clamped into IBP's box."""
    lower, upper = pre.lower.flatten(1), pre.upper.flatten(1)
    rows, cols = ((lower < 0) & (upper > 0)).nonzero(as_tuple=True)
    if rows.numel() == 0:
        return pre
    geometry = _patch_geometry(prefix, shapes)
    if geometry is not None:
        new_lower, new_upper = _back_substitute_patches(prefix, shapes, geometry, relaxations, box, rows, cols)
    else:
        neurons, which = torch.unique(cols, return_inverse=True)
        one_hot = torch.zeros(len(neurons), lower.shape[1], dtype=lower.dtype, device=lower.device)
        one_hot[torch.arange(len(neurons)), neurons] = 1
        new_lower, new_upper = _back_substitute(
            prefix, shapes, relaxations, box, one_hot.view(len(neurons), *pre.lower.shape[1:]),
            torch.zeros(len(neurons), dtype=lower.dtype, device=lower.device), rows, which,
        )
        new_lower, new_upper = new_lower[:, 0], new_upper[:, 0]
    refined = tighten(Interval(lower[rows, cols], upper[rows, cols]), new_lower, new_upper)
    lower, upper = lower.clone(), upper.clone()
    lower[rows, cols], upper[rows, cols] = refined.lower, refined.upper
    return Interval(lower.view_as(pre.lower), upper.view_as(pre.upper))


# A "patch": the coefficients of one convolution neuron on an earlier feature map are zero
# outside a window, the neuron's receptive field there (the idea of auto_LiRPA's conv_mode
# "patches"). Back-substitution then carries only that window: for the MNIST encoder's second
# convolution, 32x4x4 numbers on the first ReLU's map instead of 32x14x14, and 10x10 on the image
# instead of 28x28. Used for the pre-activation bounds of a prefix of Conv2d and ReLU layers (the
# encoder's), where it made full CROWN about 4x faster; the dense path handles everything else.


@dataclass(frozen=True)
class _Window:
    """Receptive field, on one feature map, of the output grid: like a convolution's kernel,
    stride and padding (per axis)."""

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]

    def unfold(self, t: Tensor) -> Tensor:
        """[B, C, H, W] -> [B, cells, C * kh * kw]: each cell's window (0 over the padding).

        (F.unfold gives the same numbers, transposed, but is far slower on the CPU.)
        """
        (ph, pw), (kh, kw), (sh, sw) = self.padding, self.kernel, self.stride
        windows = F.pad(t, (pw, pw, ph, ph)).unfold(2, kh, sh).unfold(3, kw, sw)  # [B, C, gh, gw, kh, kw]
        return windows.permute(0, 2, 3, 1, 4, 5).reshape(t.shape[0], -1, t.shape[1] * kh * kw)

    def through(self, conv: nn.Conv2d) -> "_Window":
        """The same field one convolution earlier: k' = (k-1) s_c + k_c, s' = s s_c, p' = p s_c + p_c."""
        return _Window(
            tuple((k - 1) * sc + kc for k, sc, kc in zip(self.kernel, conv.stride, conv.kernel_size)),
            tuple(s * sc for s, sc in zip(self.stride, conv.stride)),
            tuple(p * sc + pc for p, sc, pc in zip(self.padding, conv.stride, conv.padding)),
        )


def _patch_geometry(prefix, shapes) -> list[_Window] | None:
    """Windows on the input map of every layer of a Conv2d/ReLU prefix ending in a Conv2d, or
    None where patches do not apply (other layers, groups, dilation, or a grid that disagrees)."""
    if not prefix or type(prefix[-1]) is not nn.Conv2d:
        return None
    for layer in prefix:
        if type(layer) is nn.ReLU:
            continue
        if type(layer) is not nn.Conv2d or layer.groups != 1 or tuple(layer.dilation) != (1, 1):
            return None
    last = prefix[-1]
    window = _Window(tuple(last.kernel_size), tuple(last.stride), tuple(last.padding))
    windows = [window] * len(prefix)
    for p in range(len(prefix) - 2, -1, -1):
        if type(prefix[p]) is nn.Conv2d:
            window = window.through(prefix[p])
        windows[p] = window
    grid = tuple(shapes[len(prefix)][-2:])
    for p, window in enumerate(windows):
        size = tuple(shapes[p][-2:])
        if tuple((h + 2 * q - k) // s + 1 for h, q, k, s in zip(size, window.padding, window.kernel, window.stride)) != grid:
            return None
    return windows


def _compose(conv: nn.Conv2d, window: _Window, channels: int) -> Tensor:
    """The matrix taking a patch on a conv's output map (window ``window``, ``channels``) to the
    patch on its input map: the transposed convolution of each unit patch. [C*kh*kw, C_in*kh'*kw']"""
    size = channels * math.prod(window.kernel)
    units = torch.eye(size, dtype=conv.weight.dtype, device=conv.weight.device).view(size, channels, *window.kernel)
    return F.conv_transpose2d(units, conv.weight, None, conv.stride).flatten(1)


def _back_substitute_patches(prefix, shapes, windows: list[_Window], relaxations, box: Interval, rows: Tensor,
                             cols: Tensor) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of the last convolution's neurons ``cols`` (flat index) of examples
    ``rows``, by back-substitution on windows: the sums of :func:`_back_substitute`. -> [G]

    Neurons at one cell of one example share their windows, and so the relaxations they meet:
    each (example, cell) holding an unstable neuron is one group, carrying all output channels.
    Coefficients: [groups, out channels, C * kh * kw] (a patch, flattened), on map m = the input
    of layer m, with window ``windows[m]``.
    """
    last = prefix[-1]
    cells = math.prod(shapes[len(prefix)][-2:])
    groups, which = torch.unique(rows * cells + cols % cells, return_inverse=True)
    group_rows, group_cells = groups // cells, groups % cells
    per_group = last.out_channels * max(shapes[m][0] * math.prod(windows[m].kernel) for m in range(len(prefix)))
    chunk = _chunk_size(per_group * box.lower.element_size())
    unfolded = {p: tuple(windows[p].unfold(t) for t in (r.lower_slope, r.upper_slope, r.upper_intercept))
                for p, r in relaxations.items() if p < len(prefix)}
    compositions, valid = {}, {}
    for p, layer in enumerate(prefix[:-1]):
        if type(layer) is nn.Conv2d:
            compositions[p] = _compose(layer, windows[p + 1], shapes[p + 1][0])
            # Entries over the zero padding of map p + 1 are no neurons of this conv: dropped.
            valid[p] = windows[p + 1].unfold(box.lower.new_ones(1, *shapes[p + 1]))[0]  # [cells, C*kh*kw]
    inputs = (windows[0].unfold(box.center), windows[0].unfold(box.radius))  # [B, cells, C * kh * kw]
    lowers, uppers = [], []
    for start in range(0, len(groups), chunk):
        r, c = group_rows[start : start + chunk], group_cells[start : start + chunk]
        a = last.weight.flatten(1).unsqueeze(0)  # [1, O, C*kh*kw]: a neuron's kernel is its patch
        const = (last.bias if last.bias is not None else a.new_zeros(a.shape[1])).unsqueeze(0)
        lo = hi = (a, const)
        for p in range(len(prefix) - 2, -1, -1):
            layer = prefix[p]
            if type(layer) is nn.ReLU:
                slopes = (u[r, c].unsqueeze(1) for u in unfolded[p])
                lo, hi = _relu_rule(*slopes, lo, hi, dims=(2,))
                continue
            new = []
            for a_b, c_b in (lo,) if hi is lo else (lo, hi):
                a_b = a_b * valid[p][c].unsqueeze(1)
                if layer.bias is not None:
                    c_b = c_b + a_b.view(*a_b.shape[:2], layer.out_channels, -1).sum(3) @ layer.bias
                new.append((a_b @ compositions[p], c_b))
            lo, hi = (new[0], new[0]) if hi is lo else (new[0], new[1])
        center, radius = (t[r, c].unsqueeze(2) for t in inputs)  # [G, C*kh*kw, 1]
        for (a_b, c_b), sign, out in ((lo, -1, lowers), (hi, 1, uppers)):
            a_b = a_b.expand(len(r), *a_b.shape[1:])
            out.append(c_b + torch.bmm(a_b, center).squeeze(2) + sign * torch.bmm(a_b.abs(), radius).squeeze(2))
    channel = cols // cells
    return torch.cat(lowers)[which, channel], torch.cat(uppers)[which, channel]


def _relax_backward(layers, box: Interval, intermediate: str):
    """The forward pass of :func:`_backward_bounds`: every ReLU's input box (IBP, refined first
    with "crown") and relaxation, the shapes, and IBP's box of the output."""
    shapes, relaxations, boxes, ibp = [box.lower.shape[1:]], {}, {}, box
    for position, layer in enumerate(layers):
        if type(layer) is nn.ReLU:
            if intermediate == "crown" and _needs_refinement(layers[:position]):
                ibp = _refine_backward(layers[:position], shapes, relaxations, box, ibp)
            relaxations[position], boxes[position] = relu_relaxation(ibp), ibp
        ibp = propagate(layer, ibp)
        shapes.append(ibp.lower.shape[1:])
    return shapes, relaxations, boxes, ibp


def _backward_bounds(layers, box: Interval, spec: tuple[Tensor, Tensor] | None, intermediate: str) -> Interval:
    """Bounds of the layers' output (then of ``spec``, a final linear map) by back-substitution:
    a forward pass fixes every ReLU's relaxation (IBP boxes, refined first with "crown"), then one
    back-substitution from the outputs."""
    shapes, relaxations, _, ibp = _relax_backward(layers, box, intermediate)
    return _backward_output(layers, shapes, relaxations, box, spec, ibp)


def _backward_output(layers, shapes, relaxations, box: Interval, spec, ibp: Interval) -> Interval:
    """The back-substitution of :func:`_backward_bounds`, from the outputs (or ``spec``), clamped into IBP's box."""
    if spec is None:
        size = math.prod(shapes[-1])
        weight = torch.eye(size, dtype=box.lower.dtype, device=box.lower.device).view(size, *shapes[-1])
        spec_out = (weight, torch.zeros(size, dtype=box.lower.dtype, device=box.lower.device))
    else:
        spec_out, ibp = (spec[0].view(-1, *shapes[-1]), spec[1]), _spec_interval(spec, ibp)
    rows = torch.arange(box.lower.shape[0], device=box.lower.device)
    lower, upper = _back_substitute(layers, shapes, relaxations, box, *spec_out, rows, None)
    return tighten(ibp, lower.view_as(ibp.lower), upper.view_as(ibp.upper))


# --- Forward: linear functions of the input carried layer by layer ---------------------------


@dataclass(frozen=True)
class _Linear:
    """A linear function of the flattened input z [K] per neuron: ``coef . z + const``.

    coef [G or 1, K, *shape] (G examples, or 1 while it is the same for all), const [G or 1, *shape].
    """

    coef: Tensor
    const: Tensor

    def bound(self, center: Tensor, radius: Tensor, sign: int) -> Tensor:
        """min (sign -1) or max (+1) over the box z = center +- radius ([G, K]): [G, *shape]."""
        flat = self.coef.flatten(2)  # [., K, P]
        value = torch.matmul(center.unsqueeze(1), flat) + sign * torch.matmul(radius.unsqueeze(1), flat.abs())
        return self.const + value.view(center.shape[0], *self.const.shape[1:])


def _forward_affine(apply: Callable[[Tensor, Tensor, Tensor | None], Tensor], weight: Tensor, bias: Tensor | None,
                    lo: _Linear, hi: _Linear) -> tuple[_Linear, _Linear]:
    """An affine map (``apply(v, weight, bias)``) on [lower, upper] linear functions, in the
    center/radius form of IBP: the same algebra holds for functions, W+ L + W- U = W C - |W| R and
    W+ U + W- L = W C + |W| R with C = (L + U)/2, R = (U - L)/2 (halves folded into W as in IBP)."""
    if hi is lo:  # no relaxation met yet: one exact function
        f = _Linear(apply(lo.coef, weight, None), apply(lo.const, weight, bias))
        return f, f
    half, half_abs = weight / 2, weight.abs() / 2
    center = _Linear(apply(hi.coef + lo.coef, half, None), apply(hi.const + lo.const, half, bias))
    radius = _Linear(apply(hi.coef - lo.coef, half_abs, None), apply(hi.const - lo.const, half_abs, None))
    return (_Linear(center.coef - radius.coef, center.const - radius.const),
            _Linear(center.coef + radius.coef, center.const + radius.const))


def _forward_layer(layer: nn.Module, lo: _Linear, hi: _Linear, out_shape: torch.Size) -> tuple[_Linear, _Linear]:
    """An affine or reshape layer on the per-neuron functions (coef [G, K, *in], const [G, *in])."""
    in_dims = lo.const.dim() - 1

    def apply(t: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        lead = t.shape[: t.dim() - in_dims]  # [G] or [G, K]
        if type(layer) in _RESHAPES:
            return t.reshape(*lead, *out_shape)
        return _APPLY[type(layer)](layer, t.reshape(-1, *t.shape[len(lead):]), weight, bias).view(*lead, *out_shape)

    if type(layer) in _RESHAPES:
        moved = [_Linear(apply(f.coef, None, None), apply(f.const, None, None)) for f in ((lo,) if hi is lo else (lo, hi))]
        return moved[0], moved[-1]
    return _forward_affine(apply, layer.weight, layer.bias, lo, hi)


def _forward_relu(relaxation: Relaxation, lo: _Linear, hi: _Linear) -> tuple[_Linear, _Linear]:
    """relu(y) >= s_l y >= s_l L(z) and relu(y) <= s_u y + t <= s_u U(z) + t (slopes >= 0)."""
    lower_slope, upper_slope = relaxation.lower_slope, relaxation.upper_slope
    return (_Linear(lower_slope.unsqueeze(1) * lo.coef, lower_slope * lo.const),
            _Linear(upper_slope.unsqueeze(1) * hi.coef, upper_slope * hi.const + relaxation.upper_intercept))


def _forward_chunk(layers, shapes, box: Interval, spec, intermediate: str) -> tuple[Interval, dict[int, Interval]]:
    """Forward mode on one chunk of examples: the input's own coordinates are the first functions
    (the same for every example until the first ReLU), IBP runs alongside for the clamps.
    Returns the output's bounds and every ReLU's input box (by position)."""
    size = math.prod(box.lower.shape[1:])
    center, radius = box.center.flatten(1), box.radius.flatten(1)
    eye = torch.eye(size, dtype=box.lower.dtype, device=box.lower.device)
    lo = hi = _Linear(eye.view(1, size, *box.lower.shape[1:]), torch.zeros_like(box.lower[:1]))
    ibp, boxes = box, {}
    for position, layer in enumerate(layers):
        if type(layer) is nn.ReLU:
            if intermediate == "crown" and _needs_refinement(layers[:position]):
                ibp = tighten(ibp, lo.bound(center, radius, -1), hi.bound(center, radius, +1))
            boxes[position] = ibp
            lo, hi = _forward_relu(relu_relaxation(ibp), lo, hi)
        else:
            lo, hi = _forward_layer(layer, lo, hi, shapes[position + 1])
        ibp = propagate(layer, ibp)
    if spec is not None:
        weight, bias = spec
        flat_lo = _Linear(lo.coef.flatten(2), lo.const.flatten(1))
        flat_hi = flat_lo if hi is lo else _Linear(hi.coef.flatten(2), hi.const.flatten(1))
        lo, hi = _forward_affine(F.linear, weight, bias, flat_lo, flat_hi)
        ibp = _spec_interval(spec, ibp)
    return tighten(ibp, lo.bound(center, radius, -1).expand_as(ibp.lower),
                   hi.bound(center, radius, +1).expand_as(ibp.upper)), boxes


def _concat(parts: Sequence[Interval]) -> Interval:
    return Interval(torch.cat([p.lower for p in parts]), torch.cat([p.upper for p in parts]))


def _relax_forward(layers, box: Interval, spec, intermediate: str) -> tuple[Interval, dict[int, Interval]]:
    """Bounds of the layers' output (then of ``spec``) by forward mode, and every ReLU's input box."""
    shapes = _shapes(layers, box)
    size = math.prod(shapes[0])
    chunk = _chunk_size((size + 1) * max(math.prod(s) for s in shapes) * box.lower.element_size())
    parts = [
        _forward_chunk(layers, shapes, Interval(box.lower[i : i + chunk], box.upper[i : i + chunk]), spec, intermediate)
        for i in range(0, box.lower.shape[0], chunk)
    ]
    boxes = {position: _concat([p[1][position] for p in parts]) for position in parts[0][1]}
    return _concat([p[0] for p in parts]), boxes


def _forward_bounds(layers, box: Interval, spec, intermediate: str) -> Interval:
    """Bounds of the layers' output (then of ``spec``, a final linear map) by forward mode."""
    return _relax_forward(layers, box, spec, intermediate)[0]


def _shapes(layers, box: Interval) -> list[torch.Size]:
    """Per-example shape at the input of every layer, and at the output."""
    with torch.no_grad():
        x = torch.zeros_like(box.lower[:1])  # a copy: an in-place first layer must not write into the box
        shapes = [x.shape[1:]]
        for layer in layers:
            x = layer(x)
            if x.shape[0] != 1:
                raise TypeError(f"layer {layer} mixes the batch dimension into its output")
            shapes.append(x.shape[1:])
    return shapes


# --- Public API ----------------------------------------------------------------------------


def _bounds(layers, box: Interval, spec: tuple[Tensor, Tensor] | None, intermediate: str, direction: str) -> Interval:
    if intermediate not in INTERMEDIATE:
        raise ValueError(f"intermediate must be one of {INTERMEDIATE}, got {intermediate!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    body, output_maps = _split_layers(layers)
    if direction == "auto":
        inputs = math.prod(box.lower.shape[1:])
        outputs = spec[0].shape[0] if spec is not None else math.prod(_shapes(body, box)[-1])
        direction = "forward" if inputs < outputs else "backward"
    bounds = (_forward_bounds if direction == "forward" else _backward_bounds)(body, box, spec, intermediate)
    for layer in output_maps:
        bounds = bounds.map_increasing(layer)
    return bounds


def linear_bounds(
    layers: nn.Module | Sequence[nn.Module], box: Interval, *, intermediate: str = DEFAULT_INTERMEDIATE,
    direction: str = "auto",
) -> Interval:
    """Bounds on ``layers(x)`` for every x in ``box`` ([B, ...]), by linear relaxation, clamped
    into IBP's box. Layers: Linear, Conv2d, ConvTranspose2d, ReLU, Flatten, Unflatten (nested
    Sequentials are opened), and Sigmoid at the end; any other raises ``TypeError``."""
    return _bounds(layers, box, None, intermediate, direction)


def encoder_intervals(
    model: VAE, box: Interval, *, intermediate: str = DEFAULT_INTERMEDIATE, direction: str = "auto"
) -> tuple[Interval, Interval]:
    """Bounds on mu(x) and log sigma(x) for x in ``box``: both heads stacked into one linear map
    on the encoder's features, bounded in one pass (one function per head output)."""
    heads = (model.mu_head, model.log_sigma_head)
    spec = (torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads]))
    both = _bounds(model.encoder, box, spec, intermediate, direction)
    k = model.mu_head.out_features
    return Interval(both.lower[:, :k], both.upper[:, :k]), Interval(both.lower[:, k:], both.upper[:, k:])


def decoder_interval(
    model: VAE, latent: Interval, *, intermediate: str = DEFAULT_INTERMEDIATE, direction: str = "auto"
) -> Interval:
    """Bounds on the decoder's mean g(z) for z in ``latent`` ([B, latent_dim])."""
    return _bounds(model.decoder, latent, None, intermediate, direction)


@dataclass(frozen=True)
class RelaxedNetwork:
    """A network body (its trailing Sigmoids apart) with every ReLU relaxed for one input box.

    ``pre_activation[p]`` / ``relaxations[p]``: the input box of the ReLU at position p and its
    relaxation; ``shapes``: the per-example shape at each layer's input, then at the output;
    ``output``: bounds on the body's output. What other specifications than a box need to
    back-substitute through the network (:func:`back_substitute_lower`, ``provae.elbo_relaxation``).
    """

    layers: list[nn.Module]
    shapes: list[torch.Size]
    pre_activation: dict[int, Interval]
    relaxations: dict[int, Relaxation]
    output: Interval


def encoder_relaxation(
    model: VAE, box: Interval, *, intermediate: str = DEFAULT_INTERMEDIATE
) -> tuple[RelaxedNetwork, Interval, Interval]:
    """The encoder relaxed by back-substitution for x in ``box``, and the bounds on mu and log sigma:
    the computation of :func:`encoder_intervals` with direction "backward" (the one "auto" picks
    for images: more pixels than heads' outputs), so the same boxes. ``output``: the features' IBP box."""
    layers, _ = _split_layers(model.encoder)
    shapes, relaxations, boxes, ibp = _relax_backward(layers, box, intermediate)
    heads = (model.mu_head, model.log_sigma_head)
    spec = (torch.cat([h.weight for h in heads]), torch.cat([h.bias for h in heads]))
    both = _backward_output(layers, shapes, relaxations, box, spec, ibp)
    k = model.mu_head.out_features
    network = RelaxedNetwork(layers, shapes, boxes, relaxations, ibp)
    return network, Interval(both.lower[:, :k], both.upper[:, :k]), Interval(both.lower[:, k:], both.upper[:, k:])


def decoder_relaxation(model: VAE, latent: Interval, *, intermediate: str = DEFAULT_INTERMEDIATE) -> RelaxedNetwork:
    """The decoder's body (before its Sigmoid) relaxed by forward mode for z in ``latent``: the
    computation of :func:`decoder_interval` with direction "forward" (the one "auto" picks: 50
    latent inputs, more pixels), so ``output`` mapped by the Sigmoid is its box, bit for bit."""
    layers, _ = _split_layers(model.decoder)
    output, boxes = _relax_forward(layers, latent, None, intermediate)
    relaxations = {position: relu_relaxation(pre) for position, pre in boxes.items()}
    return RelaxedNetwork(layers, _shapes(layers, latent), boxes, relaxations, output)


def back_substitute_lower(
    network: RelaxedNetwork, coef: Tensor, const: Tensor, lower_slopes: dict[int, Tensor] | None = None,
    rows: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """A linear lower bound on ``coef . f(v) + const`` as a function of the network's input v, one
    set of coefficients per group (CROWN, Zhang et al. 2018, Theorem 3.2, its lower side).

    coef [G, M, *output shape], const [G, M] -> coef [G, M, *input shape], const [G, M]; group g
    belongs to example ``rows[g]`` (default: example g). Affine layers map the coefficients
    exactly; at a ReLU a positive coefficient takes the lower line, a negative one the upper line
    (its intercept joins the constant). ``lower_slopes`` (ReLU position -> [B, *shape]) replaces
    CROWN's lower slopes: any slope in [0, 1] of an unstable neuron gives a valid lower line
    (alpha-CROWN, Xu et al. 2021, optimises them); a stable neuron must keep its own.
    """
    lower_slopes = lower_slopes or {}

    def at(t: Tensor) -> Tensor:  # [B, *shape] -> [G, 1, *shape]
        return (t if rows is None else t[rows]).unsqueeze(1)

    for position in range(len(network.layers) - 1, -1, -1):
        layer = network.layers[position]
        if type(layer) is nn.ReLU:
            relaxation = network.relaxations[position]
            negative = coef.clamp(max=0)
            const = const + (negative.flatten(2) @ at(relaxation.upper_intercept).flatten(2).transpose(1, 2)).squeeze(2)
            lower_slope = lower_slopes.get(position, relaxation.lower_slope)
            coef = (coef - negative) * at(lower_slope) + negative * at(relaxation.upper_slope)
            continue
        batch, specs = coef.shape[:2]
        back, extra = _back_affine(layer, coef.reshape(batch * specs, *coef.shape[2:]), network.shapes[position])
        coef = back.view(batch, specs, *back.shape[1:])
        const = const if extra is None else const + extra.view(batch, specs)
    return coef, const


def crown_elbo_lower_bound(
    model: VAE, x: Tensor, eps: float | Tensor, noise: Tensor, sigma0: float = 1.0, clip: bool = True,
    intermediate: str = DEFAULT_INTERMEDIATE,
) -> Tensor:
    """LB_e(x, eps) of ``provae.bounds.elbo_lower_bound`` (method.md, steps 1-6), with the encoder
    and decoder boxes of steps 1 and 4 from linear relaxation instead of IBP. [B]

    The same guarantee (``elbo(model, x', noise) >= LB`` for every x' in ``input_box(x, eps,
    clip)``); never below the IBP certificate (every box lies inside IBP's); equal to ``elbo``
    at eps = 0.
    """
    _check_noise(model, x, noise)
    scale = _log_likelihood_scale(sigma0)
    box = input_box(x, eps, clip)
    mu, log_sigma = encoder_intervals(model, box, intermediate=intermediate)
    decoded = decoder_interval(model, latent_box(mu, log_sigma, noise), intermediate=intermediate)
    return -scale * reconstruction_upper_bound(box, decoded) - kl_upper_bound(mu, log_sigma)
