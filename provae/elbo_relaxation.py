"""The ELBO itself as the specification: one linear lower bound of ELBO_e(x') in the attacked x'.

The box-wise certificates (``provae.bounds``, ``provae.linear_bounds``) bound every term of the
ELBO over its own box and add the worst cases, as if each pixel could come from a different z and
the reconstruction target x' could move apart from the x' the encoder sees. Here the whole ELBO of
one noise draw e (method.md, "A linear relaxation of the ELBO itself"),

    ELBO_e(x') = -s sum_i d_i^2 - 1/2 sum_j (mu_j^2 + exp(2 l_j) - 2 l_j - 1),
    d = x' - g,  g = sigmoid(h(z)),  z = mu + exp(l) e,  (mu, l) = heads(encoder(x')),  s = 1 / (2 sigma0^2),

is bounded below by one linear function w . x' + w0, minimised over the ball once:

1. the convex terms mu_j^2 and exp(2 l_j) are bounded above by their chords over their intervals,
   d_i^2 by a plane in (d_i, g_i) over their polygon (the chord in d by default), the linear
   term -2 l_j is kept exactly (``provae.relaxations``; one function per step below);
2. the coefficients are carried back: d = x' - g gives x' its direct coefficient and g another;
   g = sigmoid(h) takes sigmoid's lower or upper line by the coefficient's sign, the decoder's
   ReLUs CROWN's lines; z = mu + exp(l) e gives mu its coefficient and exp(l) a tangent
   (coefficient of exp(l) >= 0) or the chord (< 0); then the heads and the encoder to x';
3. min over the ball: sum_i min(w_i lo_i, w_i hi_i) + w0 (Zhang et al. 2018, Corollary 3.3).

Every interval it needs (pre-ReLU, pre-sigmoid h, mu, l, d) only has to contain its quantity:
with ``decoder_boxes="latent"`` they come from ``provae.linear_bounds`` (the decoder's from the z
box: the plain recipe); with ``"input"`` the decoder's pre-activations, h and d are bounded again,
each neuron by the same back-substitution through the whole VAE to x', which keeps the
correlations the z box loses, so the lines and chords get shorter. ``slope_steps`` > 0 then
optimises the free lines (ReLU lower slopes, exp's tangent points, sigmoid's slopes, the
reconstruction planes' tilt) by projected gradient ascent on the bound (alpha-CROWN style, Xu et
al. 2021); every step's bound is valid, and the best per image is kept.

The certificate is the largest of this bound, the box-wise ones on the same boxes, and IBP's: it
is never looser than any of them. Where a bound overflows it is -inf (vacuous), never NaN.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .bounds import (_check_noise, _log_likelihood_scale, elbo_lower_bound, input_box, kl_upper_bound, latent_box,
                     reconstruction_upper_bound)
from .interval import Interval
from .linear_bounds import (DEFAULT_INTERMEDIATE, RelaxedNetwork, back_substitute_lower, decoder_relaxation,
                            encoder_relaxation, relu_relaxation, tighten)
from .model import VAE
from .relaxations import (exp_chord, exp_parallel_point, exp_tangent, sigmoid_chord_slope, sigmoid_lines, square_chord,
                          square_plane_intercept)

DECODER_BOXES = ("latent", "input")
# Working memory for one chunk of intermediate bounds (a few coefficient maps per bounded neuron).
MEMORY_BUDGET_BYTES = 1 << 28


@dataclass(frozen=True)
class ElboBounds:
    """Per image [B]: IBP's certificate, the best box-wise one (``linear_bounds``' boxes, and with
    ``decoder_boxes="input"`` the same formula on the tighter boxes), the linear relaxation of the
    ELBO, and the certificate, the largest of the three."""

    ibp: Tensor
    box_wise: Tensor
    linear: Tensor
    certificate: Tensor


@dataclass(frozen=True)
class Boxes:
    """Intervals of every intermediate quantity, for every x' in ``ball``, and the relaxations."""

    ball: Interval
    encoder: RelaxedNetwork  # its ReLUs' boxes and relaxations
    mu: Interval
    log_sigma: Interval
    decoder: RelaxedNetwork  # the decoder's body; ``output`` is the pre-sigmoid box of h
    residual: Interval  # d = x' - g(z), g = sigmoid(h)


@dataclass(frozen=True)
class FreeLines:
    """Lines a valid relaxation may choose instead of the defaults (None): lower slopes of the
    unstable ReLUs (position -> [B, *shape], in [0, 1]), exp's tangent points (in the l interval,
    [B, k]), sigmoid's slopes ([B, D], in [0, its largest derivative on the h interval]), and the
    reconstruction planes' slopes on d and on g ([B, D] each; default the chord, (d_L + d_U, 0))."""

    encoder_slopes: dict[int, Tensor] | None = None
    decoder_slopes: dict[int, Tensor] | None = None
    exp_points: Tensor | None = None
    sigmoid_slopes: Tensor | None = None
    planes: tuple[Tensor, Tensor] | None = None


def vacuous_if_undefined(bound: Tensor) -> Tensor:
    """NaN (inf - inf, 0 * inf after an overflow) as -inf: a lower bound that says nothing."""
    return torch.where(torch.isnan(bound), -math.inf, bound)


def _pick(condition: Tensor, first, second) -> tuple[Tensor, Tensor]:
    """Slope and intercept of ``first`` where ``condition``, of ``second`` elsewhere."""
    return torch.where(condition, first.slope, second.slope), torch.where(condition, first.intercept, second.intercept)


def _heads(model: VAE, on_m: Tensor) -> tuple[Tensor, Tensor]:
    """Coefficients on m = (mu, l) [..., 2k] through the two heads: on the encoder's features, and the constant."""
    k = model.latent_dim
    on_mu, on_l = on_m[..., :k], on_m[..., k:]
    return (on_mu @ model.mu_head.weight + on_l @ model.log_sigma_head.weight,
            on_mu @ model.mu_head.bias + on_l @ model.log_sigma_head.bias)


# --- Each step of the relaxation: lower lines of one term in its own variables ------------------
# Each returns coefficients and a constant with  term >= coefficients . variables + constant  for
# every value of the variables in their intervals (tests/test_elbo_relaxation.py samples them).


def reconstruction_plane(d: Interval, g: Interval, x: Interval, scale: float,
                         planes: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-s sum_i d_i^2 >= direct . x' + on_g . g + const, for d = x' - g with d, g, x' in their
    boxes ([B, D] each): d_i^2 <= p d_i + q g_i + r_i, a plane over the polygon of (d_i, g_i)
    (``square_plane_intercept``; the chord by default: p = d_L + d_U, q = 0), then d = x' - g:
    direct = -s p, on_g = s (p - q), const = -s sum r."""
    p, q = (d.lower + d.upper, torch.zeros_like(d.lower)) if planes is None else planes
    r = square_plane_intercept(p, q, (d.lower, d.upper), (g.lower, g.upper), (x.lower, x.upper))
    return -scale * p, scale * (p - q), -scale * r.sum(-1)


def sigmoid_lower(on_g: Tensor, h: Interval, slopes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """on_g . sigmoid(h) >= on_h . h + const for h in its box: sigmoid's lower line where the
    coefficient is >= 0, its upper line elsewhere (``sigmoid_lines``, slopes ``slopes`` or the chord's)."""
    below, above = sigmoid_lines(h.lower, h.upper, slopes)
    slope, intercept = _pick(on_g >= 0, below, above)
    return on_g * slope, (on_g * intercept).sum(-1)


def latent_lines(on_z: Tensor, log_sigma: Interval, noise: Tensor,
                 points: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """on_z . z >= on_m . m + const for z = mu + exp(l) e, l in its box: on_z e_j exp(l_j) takes
    exp's tangent (at ``points``, default where it is parallel to the chord) where on_z e_j >= 0
    and its chord over [l_L, l_U] elsewhere (both finite, with finite gradients, wherever exp(l_U)
    is). on_z [..., k] -> on_m [..., 2k] (mu's, then l's), const."""
    points = exp_parallel_point(log_sigma.lower, log_sigma.upper) if points is None else points
    on_exp = on_z * noise
    slope, intercept = _pick(on_exp >= 0, exp_tangent(points), exp_chord(log_sigma.lower, log_sigma.upper))
    return torch.cat([on_z, on_exp * slope], -1), (on_exp * intercept).sum(-1)


def kl_lines(mu: Interval, log_sigma: Interval) -> tuple[Tensor, Tensor]:
    """-KL >= on_m . m + const for mu, l in their boxes ([B, k] each): -1/2 (mu^2 + exp(2 l)) >=
    -1/2 (their chords; exp(2 l)'s finite, with finite gradients, wherever exp(2 l_U) is); the rest,
    -1/2 (-2 l - 1), exactly. -> on_m [B, 2k], const [B]."""
    mu_chord, exp2_chord = square_chord(mu.lower, mu.upper), exp_chord(log_sigma.lower, log_sigma.upper, rate=2.0)
    on_m = torch.cat([-0.5 * mu_chord.slope, 1 - 0.5 * exp2_chord.slope], -1)
    return on_m, -0.5 * (mu_chord.intercept + exp2_chord.intercept - 1).sum(-1)


# --- One linear function of x', bounded through the whole VAE ---------------------------------


def _lower_bound(model: VAE, boxes: Boxes, noise: Tensor, rows: Tensor, position: int, on_layer: Tensor,
                 const: Tensor, on_m: Tensor | None = None, direct: Tensor | None = None,
                 lines: FreeLines = FreeLines()) -> Tensor:
    """min over the ball of a linear lower bound of  on_layer . v + on_m . m + direct . x' + const,
    v the input of the decoder's layer ``position`` (its output at the end), m = (mu, l), for
    examples ``rows`` [G], n functions each (on_layer [G, n, *shape], on_m [G, n, 2k], direct
    [G, n, D], const [G, n]). Back through the decoder's first ``position`` layers to z (CROWN's
    lines), through z = mu + exp(l) e to m (exp's tangent where exp(l)'s coefficient is >= 0, its
    chord elsewhere), through the heads and the encoder to x'; minimised over the ball
    (Corollary 3.3), or over the m box; the larger. [G, n]"""
    decoder = boxes.decoder
    prefix = replace(decoder, layers=decoder.layers[:position], shapes=decoder.shapes[: position + 1])
    on_z, const = back_substitute_lower(prefix, on_layer, const, lines.decoder_slopes, rows)
    points = None if lines.exp_points is None else lines.exp_points[rows].unsqueeze(1)
    log_sigma = Interval(boxes.log_sigma.lower[rows].unsqueeze(1), boxes.log_sigma.upper[rows].unsqueeze(1))
    on_latent, extra = latent_lines(on_z, log_sigma, noise[rows].unsqueeze(1), points)
    on_m, const = on_latent + (0 if on_m is None else on_m), const + extra
    # Over the m box: each m_j at the end its coefficient's sign asks for.
    m_low = torch.cat([boxes.mu.lower, boxes.log_sigma.lower], 1)[rows].unsqueeze(2)
    m_high = torch.cat([boxes.mu.upper, boxes.log_sigma.upper], 1)[rows].unsqueeze(2)
    positive = on_m.clamp(min=0)
    by_box = const + (positive @ m_low + (on_m - positive) @ m_high).squeeze(2)
    ball = boxes.ball
    lo, hi = ball.lower.flatten(1)[rows].unsqueeze(1), ball.upper.flatten(1)[rows].unsqueeze(1)
    if direct is not None:
        by_box = by_box + torch.minimum(direct * lo, direct * hi).sum(2)
    # Through the encoder: each function picks the encoder's ReLU lines by its own signs.
    on_features, extra = _heads(model, on_m)
    on_x, const = back_substitute_lower(boxes.encoder, on_features, const + extra, lines.encoder_slopes, rows)
    on_x = on_x.flatten(2) + (0 if direct is None else direct)
    through = const + (on_x * (lo + hi) / 2).sum(2) - (on_x.abs() * (hi - lo) / 2).sum(2)
    return torch.fmax(through, by_box)


# --- Intervals ---------------------------------------------------------------------------------


def latent_boxes(model: VAE, ball: Interval, noise: Tensor, intermediate: str = DEFAULT_INTERMEDIATE) -> Boxes:
    """The plain recipe's boxes: ``linear_bounds``' encoder boxes, the decoder's from the z box,
    d in [lo - g_U, hi - g_L] (the boxes of ``crown_elbo_lower_bound``, bit for bit)."""
    encoder, mu, log_sigma = encoder_relaxation(model, ball, intermediate=intermediate)
    decoder = decoder_relaxation(model, latent_box(mu, log_sigma, noise), intermediate=intermediate)
    decoded = decoder.output.map_increasing(torch.sigmoid)
    residual = Interval(ball.lower - decoded.upper, ball.upper - decoded.lower)
    return Boxes(ball, encoder, mu, log_sigma, decoder, residual)


def _chunks(select: Tensor, per_neuron_bytes: int):
    """(example, neuron indices) in chunks that fit the memory budget, for the True entries of ``select`` [B, N]."""
    size = max(1, MEMORY_BUDGET_BYTES // per_neuron_bytes)
    for row in range(select.shape[0]):
        for neurons in select[row].nonzero()[:, 0].split(size):
            yield torch.tensor([row], device=select.device), neurons


def _scaled_units(neurons: Tensor, values: Tensor, shape) -> Tensor:
    """values[i] at neuron neurons[i] of map i, zero elsewhere: [1, n, *shape]."""
    units = values.new_zeros(len(neurons), math.prod(shape))
    units[torch.arange(len(neurons)), neurons] = values
    return units.view(1, len(neurons), *shape)


def _neuron_bounds(model: VAE, boxes: Boxes, noise: Tensor, position: int, box: Interval, select: Tensor) -> Interval:
    """``box`` (the input of the decoder's layer ``position``) tightened where ``select``: each
    neuron's lower bound, and minus the lower bound of its negative, through the whole VAE."""
    lower, upper = box.lower.flatten(1).clone(), box.upper.flatten(1).clone()
    shape = boxes.decoder.shapes[position]
    widest = max(math.prod(s) for s in (*boxes.encoder.shapes, *boxes.decoder.shapes))
    for rows, neurons in _chunks(select, 8 * widest * lower.element_size()):
        zero = lower.new_zeros(1, len(neurons))
        unit = _scaled_units(neurons, torch.ones_like(neurons, dtype=lower.dtype), shape)
        below = _lower_bound(model, boxes, noise, rows, position, unit, zero)[0]
        above = -_lower_bound(model, boxes, noise, rows, position, -unit, zero)[0]
        lower[rows[0], neurons] = torch.fmax(lower[rows[0], neurons], below)
        upper[rows[0], neurons] = torch.fmin(upper[rows[0], neurons], above)
    return tighten(box, lower.view_as(box.lower), upper.view_as(box.upper))


def _residual_bounds(model: VAE, boxes: Boxes, noise: Tensor) -> Interval:
    """d = x' - sigmoid(h) per pixel: sigmoid's upper line bounds g above (so d below) and its lower
    line g below, both with slopes >= 0 (so h's own bounds can be used); x'_i keeps its own
    coefficient, the correlation the box [lo - g_U, hi - g_L] loses."""
    h, d = boxes.decoder.output, boxes.residual
    below, above = sigmoid_lines(h.lower.flatten(1), h.upper.flatten(1))
    lower, upper = d.lower.flatten(1).clone(), d.upper.flatten(1).clone()
    end, pixels = len(boxes.decoder.layers), lower.shape[1]
    widest = max(math.prod(s) for s in (*boxes.encoder.shapes, *boxes.decoder.shapes))
    for rows, n in _chunks(torch.ones_like(lower, dtype=torch.bool), 8 * (widest + pixels) * lower.element_size()):
        unit = _scaled_units(n, torch.ones_like(n, dtype=lower.dtype), (pixels,))
        r = rows[0]
        low = _lower_bound(model, boxes, noise, rows, end, _scaled_units(n, -above.slope[r, n], h.lower.shape[1:]),
                           -above.intercept[r, n].unsqueeze(0), direct=unit)[0]
        high = -_lower_bound(model, boxes, noise, rows, end, _scaled_units(n, below.slope[r, n], h.lower.shape[1:]),
                             below.intercept[r, n].unsqueeze(0), direct=-unit)[0]
        lower[r, n], upper[r, n] = torch.fmax(lower[r, n], low), torch.fmin(upper[r, n], high)
    return tighten(d, lower.view_as(d.lower), upper.view_as(d.upper))


def input_boxes(model: VAE, boxes: Boxes, noise: Tensor) -> Boxes:
    """``boxes`` with the decoder's pre-activation boxes, h's and d's bounded again as linear
    functions of x' through the whole VAE (:func:`_lower_bound`), layer by layer: each ReLU is
    relaxed on its tightened box before the next layer is bounded. Only the neurons the plain box
    leaves unstable are bounded again (a stable one is relaxed exactly already)."""
    old = boxes.decoder
    pre_activation, relaxations = {}, {}
    boxes = replace(boxes, decoder=replace(old, pre_activation=pre_activation, relaxations=relaxations))
    for position, layer in enumerate(old.layers):
        if type(layer) is nn.ReLU:
            plain = old.pre_activation[position]
            unstable = ((plain.lower < 0) & (plain.upper > 0)).flatten(1)
            pre_activation[position] = _neuron_bounds(model, boxes, noise, position, plain, unstable)
            relaxations[position] = relu_relaxation(pre_activation[position])
    every = torch.ones_like(old.output.lower, dtype=torch.bool).flatten(1)
    output = _neuron_bounds(model, boxes, noise, len(old.layers), old.output, every)
    boxes = replace(boxes, decoder=replace(boxes.decoder, output=output))
    return replace(boxes, residual=_residual_bounds(model, boxes, noise))


# --- The linear bound of the ELBO ----------------------------------------------------------------


def linear_elbo_bound(model: VAE, boxes: Boxes, noise: Tensor, scale: float, lines: FreeLines = FreeLines()) -> Tensor:
    """min over the ball of one linear lower bound of ELBO_e(x') (module docstring, steps 1-3). [B]"""
    def flat(box: Interval) -> Interval:
        return Interval(box.lower.flatten(1), box.upper.flatten(1))

    h = flat(boxes.decoder.output)
    direct, on_g, const = reconstruction_plane(flat(boxes.residual), h.map_increasing(torch.sigmoid),
                                               flat(boxes.ball), scale, lines.planes)
    on_h, extra = sigmoid_lower(on_g, h, lines.sigmoid_slopes)
    on_m, kl_const = kl_lines(boxes.mu, boxes.log_sigma)
    rows = torch.arange(h.lower.shape[0], device=h.lower.device)
    bound = _lower_bound(model, boxes, noise, rows, len(boxes.decoder.layers),
                         on_h.view_as(boxes.decoder.output.lower).unsqueeze(1), (const + extra + kl_const).unsqueeze(1),
                         on_m.unsqueeze(1), direct.unsqueeze(1), lines)
    return bound[:, 0]


# --- Optimised lines (alpha-CROWN style) ----------------------------------------------------------


def _unit(value: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Where ``value`` sits in [low, high], in [0, 1] (0.5 on a point)."""
    width = high - low
    safe = torch.where(width > 0, width, torch.ones_like(width))
    return torch.where(width > 0, (value - low) / safe, 0.5).clamp(0, 1)


def _max_sigmoid_slope(box: Interval) -> Tensor:
    """sigmoid's largest derivative on the interval, at the point of it nearest to 0."""
    nearest = torch.sigmoid(torch.minimum(torch.maximum(torch.zeros_like(box.lower), box.lower), box.upper))
    return nearest * (1 - nearest)


def optimised_bound(model: VAE, boxes: Boxes, noise: Tensor, scale: float, steps: int, lr: float = 0.02,
                    plane_lr: float = 0.1, decay: float = 0.96) -> Tensor:
    """The best linear bound per image over ``steps`` steps of projected gradient ascent (Adam,
    learning rates decayed by ``decay`` per step) on the free lines: the unstable ReLUs' lower
    slopes, exp's tangent points (a fraction of the l interval), sigmoid's slopes (a fraction of
    its largest derivative on the h interval), all in [0, 1] (rate ``lr``); the reconstruction
    planes' slopes on d and g (rate ``plane_lr``; their intercepts follow, so every plane is
    valid). Any value gives a valid bound; the start is the default lines (the chords, CROWN's
    slopes). Not differentiable in the model (the best value is kept, detached). [B]"""
    def unstable(network: RelaxedNetwork) -> dict[int, Tensor]:
        return {p: (box.lower < 0) & (box.upper > 0) for p, box in network.pre_activation.items()}

    masks = {"encoder": unstable(boxes.encoder), "decoder": unstable(boxes.decoder)}
    h, l_low, l_high = boxes.decoder.output, boxes.log_sigma.lower, boxes.log_sigma.upper
    h = Interval(h.lower.flatten(1), h.upper.flatten(1))
    largest = _max_sigmoid_slope(h)
    with torch.no_grad():
        variables = {f"{name}/{p}": getattr(boxes, name).relaxations[p].lower_slope.clone()
                     for name in masks for p in masks[name]}
        variables["exp"] = _unit(exp_parallel_point(l_low, l_high), l_low, l_high)
        variables["sigmoid"] = _unit(sigmoid_chord_slope(h.lower, h.upper), torch.zeros_like(largest), largest)
        d = boxes.residual
        variables["plane_d"] = (d.lower + d.upper).flatten(1)
        variables["plane_g"] = torch.zeros_like(variables["plane_d"])
    for value in variables.values():
        value.requires_grad_(True)

    def lines() -> FreeLines:
        def slopes(name):
            network = getattr(boxes, name)
            return {p: torch.where(mask, variables[f"{name}/{p}"], network.relaxations[p].lower_slope)
                    for p, mask in masks[name].items()}
        return FreeLines(slopes("encoder"), slopes("decoder"), l_low + variables["exp"] * (l_high - l_low),
                         variables["sigmoid"] * largest, (variables["plane_d"], variables["plane_g"]))

    planes = [variables["plane_d"], variables["plane_g"]]
    others = [value for name, value in variables.items() if not name.startswith("plane")]
    optimizer = torch.optim.Adam([{"params": others, "lr": lr}, {"params": planes, "lr": plane_lr}])
    schedule = torch.optim.lr_scheduler.ExponentialLR(optimizer, decay)
    best = None
    with torch.enable_grad():
        for step in range(steps + 1):
            bound = vacuous_if_undefined(linear_elbo_bound(model, boxes, noise, scale, lines()))
            best = bound.detach() if best is None else torch.maximum(best, bound.detach())
            if step == steps or not torch.isfinite(bound).any():
                break
            optimizer.zero_grad()
            (-bound[torch.isfinite(bound)].sum()).backward(inputs=list(variables.values()))
            optimizer.step()
            schedule.step()
            with torch.no_grad():
                for value in others:
                    value.clamp_(0, 1)
    return best


# --- The certificate ---------------------------------------------------------------------------


def elbo_relaxation_bounds(
    model: VAE, x: Tensor, eps: float | Tensor, noise: Tensor, sigma0: float = 1.0, clip: bool = True, *,
    decoder_boxes: str = "input", slope_steps: int = 0, intermediate: str = DEFAULT_INTERMEDIATE,
) -> ElboBounds:
    """The linear relaxation of ELBO_e(x') over ``input_box(x, eps, clip)``, beside IBP's and the
    box-wise certificates on the same boxes (:class:`ElboBounds`). ``decoder_boxes``: "latent"
    (the plain recipe) or "input" (through the whole VAE); ``slope_steps``: steps of
    :func:`optimised_bound` (0: CROWN's and the default lines)."""
    if decoder_boxes not in DECODER_BOXES:
        raise ValueError(f"decoder_boxes must be one of {DECODER_BOXES}, got {decoder_boxes!r}")
    if [type(layer) for layer in model.decoder][-1:] != [nn.Sigmoid]:
        raise TypeError("the ELBO relaxation needs a decoder ending in one Sigmoid")
    _check_noise(model, x, noise)
    scale = _log_likelihood_scale(sigma0)
    ball = input_box(x, eps, clip)
    boxes = latent_boxes(model, ball, noise, intermediate)
    decoded = boxes.decoder.output.map_increasing(torch.sigmoid)
    box_wise = -scale * reconstruction_upper_bound(ball, decoded) - kl_upper_bound(boxes.mu, boxes.log_sigma)
    if decoder_boxes == "input":
        boxes = input_boxes(model, boxes, noise)
        d = boxes.residual
        reconstruction = torch.maximum(d.lower**2, d.upper**2).flatten(1).sum(1)  # R_U of d's own box
        tighter = -scale * reconstruction - kl_upper_bound(boxes.mu, boxes.log_sigma)
        box_wise = torch.fmax(box_wise, tighter)
    if slope_steps > 0:
        linear = optimised_bound(model, boxes, noise, scale, slope_steps)
    else:
        linear = vacuous_if_undefined(linear_elbo_bound(model, boxes, noise, scale))
    ibp = elbo_lower_bound(model, x, eps, noise, sigma0, clip)
    certificate = torch.maximum(torch.maximum(ibp, vacuous_if_undefined(box_wise)), linear)
    return ElboBounds(ibp, vacuous_if_undefined(box_wise), linear, certificate)


def elbo_relaxation_lower_bound(
    model: VAE, x: Tensor, eps: float | Tensor, noise: Tensor, sigma0: float = 1.0, clip: bool = True, *,
    decoder_boxes: str = "input", slope_steps: int = 0, intermediate: str = DEFAULT_INTERMEDIATE,
) -> Tensor:
    """LB_e(x, eps) by the linear relaxation of the ELBO itself, intersected with IBP's and the
    box-wise certificates: for every x' in ``input_box(x, eps, clip)``, ``elbo(model, x', noise)
    >= LB``, and LB >= ``crown_elbo_lower_bound`` and ``elbo_lower_bound`` (same arguments);
    equal to ``elbo`` at eps = 0 (up to float rounding); -inf where vacuous, never NaN. [B]"""
    return elbo_relaxation_bounds(model, x, eps, noise, sigma0, clip, decoder_boxes=decoder_boxes,
                                  slope_steps=slope_steps, intermediate=intermediate).certificate
