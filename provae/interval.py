"""Interval bound propagation (IBP): one interval type and one rule per kind of layer.

An :class:`Interval` holds elementwise ``lower`` and ``upper`` bounds (lower always first).
``propagate(module, interval)`` returns an interval that contains ``module(x)`` for every
``x`` inside the input interval. Layers without a rule raise, so a new layer type can never
be bounded silently wrong (method.md, "Interval bound propagation").
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True)
class Interval:
    """Elementwise bounds ``lower <= x <= upper`` on a tensor of the same shape."""

    lower: Tensor
    upper: Tensor

    def __post_init__(self) -> None:
        if self.lower.shape != self.upper.shape:
            raise ValueError(
                f"interval ends differ in shape: {tuple(self.lower.shape)} vs {tuple(self.upper.shape)}"
            )

    @classmethod
    def point(cls, x: Tensor) -> "Interval":
        return cls(x, x)

    @property
    def center(self) -> Tensor:
        return (self.lower + self.upper) / 2

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2

    def map_increasing(self, fn: Callable[[Tensor], Tensor]) -> "Interval":
        """Bounds of a monotone non-decreasing elementwise map: apply it to both ends."""
        return Interval(fn(self.lower), fn(self.upper))

    def contains(self, x: Tensor, tol: float = 0.0) -> bool:
        return bool(((x >= self.lower - tol) & (x <= self.upper + tol)).all())


def overflow_to_vacuous(lower: Tensor, upper: Tensor) -> Interval:
    """The interval [lower, upper], with every end that is not finite made vacuous (-inf, +inf).

    An end that overflowed float32 (inf, or inf - inf = NaN, as in the center/radius form once an
    input end is infinite) carries no information, and a NaN would turn the certificate into NaN;
    the vacuous end holds for every value, so this stays sound. Finite ends are kept bit for bit.
    """
    return Interval(torch.nan_to_num(lower, nan=-math.inf, posinf=-math.inf, neginf=-math.inf),
                    torch.nan_to_num(upper, nan=math.inf, posinf=math.inf, neginf=math.inf))


def _affine(layer: nn.Module, x: Interval, apply: Callable[[Tensor, Tensor, Tensor | None], Tensor]) -> Interval:
    """Affine rule in center/radius form: c' = W c + b, r' = |W| r (paper eq. 12, cheaper form).

    With c = (u + l) / 2 and r = (u - l) / 2, the halving is folded into the (small) weight
    rather than applied to the (large) activations: c' = (W/2)(u + l) + b, r' = (|W|/2)(u - l).
    Ends that overflow come out vacuous, never NaN (:func:`overflow_to_vacuous`).
    """
    half_weight = layer.weight / 2
    center = apply(x.upper + x.lower, half_weight, layer.bias)
    radius = apply(x.upper - x.lower, half_weight.abs(), None)
    return overflow_to_vacuous(center - radius, center + radius)


def _linear(layer: nn.Linear, x: Interval) -> Interval:
    return _affine(layer, x, F.linear)


def _conv2d(layer: nn.Conv2d, x: Interval) -> Interval:
    return _affine(layer, x, layer._conv_forward)


def _conv_transpose2d(layer: nn.ConvTranspose2d, x: Interval) -> Interval:
    def apply(inp: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv_transpose2d(
            inp, weight, bias, layer.stride, layer.padding, layer.output_padding, layer.groups, layer.dilation
        )

    return _affine(layer, x, apply)


def _elementwise(layer: nn.Module, x: Interval) -> Interval:
    """Monotone maps (Sigmoid) and reshapes (Flatten, Unflatten) act on both ends."""
    return x.map_increasing(layer)


def _relu(layer: nn.ReLU, x: Interval) -> Interval:
    """ReLU on both ends, always out of place: ``nn.ReLU(inplace=True)`` would overwrite the ends
    it is given, which may be the caller's input box (a first layer) or a box kept for later."""
    return x.map_increasing(torch.relu)


def _sequential(layers: nn.Sequential, x: Interval) -> Interval:
    for layer in layers:
        x = propagate(layer, x)
    return x


_RULES: dict[type, Callable[[nn.Module, Interval], Interval]] = {
    nn.Linear: _linear,
    nn.Conv2d: _conv2d,
    nn.ConvTranspose2d: _conv_transpose2d,
    nn.ReLU: _relu,
    nn.Sigmoid: _elementwise,
    nn.Flatten: _elementwise,
    nn.Unflatten: _elementwise,
    nn.Sequential: _sequential,
}


def propagate(module: nn.Module, x: Interval) -> Interval:
    """Interval containing ``module(v)`` for every ``v`` in ``x``; unknown layers raise ``TypeError``."""
    rule = _RULES.get(type(module))
    if rule is None:
        supported = ", ".join(sorted(t.__name__ for t in _RULES))
        raise TypeError(f"no interval rule for layer {type(module).__name__}; supported: {supported}")
    return rule(module, x)


def interval_exp(x: Interval) -> Interval:
    """exp is increasing, so its bounds are the ends' images."""
    return x.map_increasing(torch.exp)
