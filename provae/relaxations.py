"""Scalar relaxations: lines above or below a one-variable function over an interval, elementwise.

The building blocks of ``provae.elbo_relaxation`` (method.md, "A linear relaxation of the ELBO
itself"). Each returns a :class:`Line` ``slope * t + intercept`` with one guarantee, valid for
every t in its interval [a, b] (a <= b, tensors of one shape; a == b allowed):

- convex f, the chord is an upper line: f(t) <= f(a) + (f(b) - f(a)) (t - a) / (b - a);
- convex f, a tangent is a lower line (everywhere): f(t) >= f(c) + f'(c) (t - c);
- the square: t^2 <= (a + b) t - a b (its chord);
- exp(r t), r > 0: its chord above; exp's tangents below (both finite, with finite gradients,
  wherever exp(r b) is: no e^{r (b - a)} is formed on wide intervals);
- sigmoid (neither convex nor concave): two parallel lines, the intercepts from the extreme gaps
  of sigmoid(t) - slope * t over [a, b], found where they can be (the ends, and the points where
  sigmoid' = slope), never from a formula that assumes convexity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Line:
    """``slope * t + intercept``, elementwise."""

    slope: Tensor
    intercept: Tensor

    def __call__(self, t: Tensor) -> Tensor:
        return self.slope * t + self.intercept


def square_chord(a: Tensor, b: Tensor) -> Line:
    """t^2 <= (a + b) t - a b on [a, b]: (t - a)(t - b) <= 0 there. No division, so a == b is fine."""
    return Line(a + b, -a * b)


def _expm1_ratio(w: Tensor) -> Tensor:
    """(e^w - 1) / w, and its limit 1 at w = 0; expm1 keeps it accurate for small w."""
    safe = torch.where(w == 0, torch.ones_like(w), w)
    return torch.where(w == 0, torch.ones_like(w), torch.expm1(safe) / safe)


def exp_chord(a: Tensor, b: Tensor, rate: float = 1.0) -> Line:
    """exp(r t) <= exp(r a) + s (t - a) on [a, b], s = (exp(r b) - exp(r a)) / (b - a), the chord's
    slope, with w = b - a: r exp(r a) (e^{r w} - 1) / (r w) where r w <= 1 (expm1: no cancellation;
    r exp(r a) at a == b), the difference quotient itself where wider. So it is finite, with a
    finite gradient, wherever exp(r b) is: the product form overflows once r w > 88 (inf, or
    0 * inf = NaN), and each form is fed only its own intervals (the other's overflow would put a
    NaN into the gradient)."""
    width = b - a
    narrow = rate * width <= 1
    start = torch.exp(rate * a)
    near = rate * start * _expm1_ratio(torch.where(narrow, rate * width, torch.zeros_like(width)))
    far = (torch.exp(rate * b) - start) / torch.where(narrow, torch.ones_like(width), width)
    slope = torch.where(narrow, near, far)
    return Line(slope, start - slope * a)


def exp_tangent(c: Tensor) -> Line:
    """exp(t) >= exp(c) (1 + t - c) everywhere (exp is convex)."""
    value = torch.exp(c)
    return Line(value, value * (1 - c))


def exp_parallel_point(a: Tensor, b: Tensor) -> Tensor:
    """The point of [a, b] where exp's tangent is parallel to its chord: c = a + log((e^w - 1) / w),
    w = b - a, which lies in [a, b]; the tangent there is the lower line closest to the chord (the
    smallest largest gap). For w > 1 as c = a + w + log1p(-e^-w) - log w: no e^w, which overflows
    once w > 88 (the point would be b, and its gradient NaN)."""
    width = b - a
    narrow = width <= 1
    near = torch.log(_expm1_ratio(torch.where(narrow, width, torch.zeros_like(width))))
    w = torch.where(narrow, torch.ones_like(width), width)
    far = w + torch.log1p(-torch.exp(-w)) - torch.log(w)
    return torch.minimum(a + torch.where(narrow, near, far), b)


def sigmoid_chord_slope(a: Tensor, b: Tensor) -> Tensor:
    """(sigmoid(b) - sigmoid(a)) / (b - a), and sigmoid'(a) where a == b: a slope >= 0 for both
    lines (the sign the relaxation through a monotone map needs)."""
    width = b - a
    degenerate = width <= 0
    chord = (torch.sigmoid(b) - torch.sigmoid(a)) / torch.where(degenerate, torch.ones_like(width), width)
    sa = torch.sigmoid(a)
    return torch.where(degenerate, sa * (1 - sa), chord).clamp(min=0)


def _sigmoid_slope_points(slope: Tensor) -> tuple[Tensor, Tensor]:
    """The two t with sigmoid'(t) = slope, for 0 < slope <= 1/4: sigmoid(t) (1 - sigmoid(t)) = slope
    gives sigmoid(t) = (1 -+ sqrt(1 - 4 slope)) / 2, the smaller written as 2 slope / (1 + sqrt(...))
    (no cancellation), and t = logit of it; the two are -t and t. Slope 0 gives -+inf, a slope
    above 1/4 (none) gives 0: points that, clamped into the interval, are harmless extra candidates."""
    slope = slope.clamp(0, 0.25)
    root = torch.sqrt((1 - 4 * slope).clamp(min=0))
    small = 2 * slope / (1 + root)
    t = torch.log(small) - torch.log1p(-small)  # <= 0; -inf at slope 0
    return t, -t


def sigmoid_lines(a: Tensor, b: Tensor, slope: Tensor | None = None) -> tuple[Line, Line]:
    """A lower and an upper line of sigmoid on [a, b], both with ``slope`` (default: the chord's).

    intercept_lower = min, intercept_upper = max of phi(t) = sigmoid(t) - slope t over [a, b]; phi
    is smooth, so its extremes are at the ends or where phi' = 0, i.e. sigmoid'(t) = slope: each
    candidate is clamped into [a, b] (a clamped one is an end, which is a candidate anyway).
    Valid for any slope; the chord's slope makes the upper line the chord where sigmoid is convex
    (b <= 0) and the lower line the chord where it is concave (a >= 0).
    """
    slope = sigmoid_chord_slope(a, b) if slope is None else slope
    first, second = _sigmoid_slope_points(slope)
    points = torch.stack([a, b, torch.minimum(torch.maximum(first, a), b), torch.minimum(torch.maximum(second, a), b)])
    gaps = torch.sigmoid(points) - slope * points
    return Line(slope, gaps.amin(0)), Line(slope, gaps.amax(0))


def square_plane_intercept(d_slope: Tensor, g_slope: Tensor, d: tuple[Tensor, Tensor], g: tuple[Tensor, Tensor],
                           x: tuple[Tensor, Tensor], tolerance: float = 1e-6) -> Tensor:
    """The least r with d^2 <= d_slope d + g_slope g + r for every (d, g) of the polygon
    {d in [d_L, d_U], g in [g_L, g_U], d + g in [x_L, x_U]} (d = x - g, all three boxed): the
    largest of d^2 - d_slope d - g_slope g over the polygon's vertices (a convex function's maximum
    over a polygon is at a vertex). Candidates: the rectangle's corners, and where the lines d + g
    = x_L, x_U cross its edges, each kept if it lies in the polygon (up to ``tolerance``, so that a
    vertex is never lost to rounding; an extra point only raises r). If rounding leaves none (a
    point box), the rectangle's corners alone, which hold the polygon. With g_slope = 0 and
    d_slope = d_L + d_U this is at most the chord's -d_L d_U: a plane in (x, g) tilted from it is
    a valid upper bound too, the freedom ``provae.elbo_relaxation`` optimises.
    """
    (d_low, d_high), (g_low, g_high), (x_low, x_high) = d, g, x
    ds = [d_low, d_low, d_high, d_high]
    gs = [g_low, g_high, g_low, g_high]
    for end in (x_low, x_high):  # the slab's two lines crossing the four edges
        ds += [d_low, d_high, end - g_low, end - g_high]
        gs += [end - d_low, end - d_high, g_low, g_high]
    d_points, g_points = torch.stack(ds), torch.stack(gs)
    values = d_points**2 - d_slope * d_points - g_slope * g_points

    def inside(t, low, high):  # relative to the numbers' size: rounding may put a vertex just outside
        return (t >= low - tolerance * (1 + low.abs())) & (t <= high + tolerance * (1 + high.abs()))

    in_rectangle = inside(d_points, d_low, d_high) & inside(g_points, g_low, g_high)
    in_polygon = in_rectangle & inside(d_points + g_points, x_low, x_high)
    polygon = torch.where(in_polygon, values, -torch.inf).amax(0)
    corners = values[:4].amax(0)
    return torch.where(in_polygon.any(0), polygon, corners)
