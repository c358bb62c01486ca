"""CROWN-IBP for the ELBO: one linear lower bound of ELBO_e(x') on IBP's boxes, cheap enough to train on.

``provae.elbo_relaxation`` bounds the ELBO of one noise draw e as one linear function of the
attacked input x' (method.md, "A linear relaxation of the ELBO itself"), but the boxes its lines
are drawn on come from linear bounds too (mu and log sigma: 100 functions back-substituted
through the encoder per image; the decoder's: 50 functions carried forward), which costs
50-300x an IBP step. Here, as in CROWN-IBP (Zhang et al. 2020, "Towards stable and efficient
training of verifiably robust neural networks", section 3), every intermediate box comes from
IBP (method.md steps 1, 3, 4: the boxes of ``provae.bounds.elbo_lower_bound``, bit for bit),
and only the final specification, the ELBO itself, is back-substituted. It is one scalar per
image, so the back-substitution carries one coefficient map per image and layer: about the cost
of one backward pass through the VAE, batched over the whole minibatch, no per-neuron or
per-image loop.

With d = x' - g, g = sigmoid(h(z)), z = mu + exp(l) e, (mu, l) = heads(encoder(x')),
s = 1 / (2 sigma0^2), and every quantity in its IBP box:

    ELBO_e(x') = -s sum_i d_i^2 - 1/2 sum_j (mu_j^2 + exp(2 l_j) - 2 l_j - 1)

(E1) -s d_i^2 >= -s ((d_L + d_U) d_i - d_L d_U): the chord of the square over IBP's
     [d_L, d_U] = [lo - g_U, hi - g_L] (``relaxations.square_chord``); d = x' - g splits it into a
     direct coefficient -s p on x' and s p on g, p = d_L + d_U. (The tightest intercept over the
     polygon {d, g boxed, d + g = x' boxed}, ``square_plane_intercept``, is the same number for
     this slope: both ends of d's box are vertices of the polygon.)
(E2) -1/2 mu_j^2 >= -1/2 (chord of the square over [mu_L, mu_U]); -1/2 exp(2 l_j) >= -1/2 (chord
     of exp(2 .) over [l_L, l_U]); -2 l_j and -1 exactly (``elbo_relaxation.kl_lines``);
(E3) c_i g_i = c_i sigmoid(h_i) >= c_i (a h_i + b_lo) if c_i >= 0, c_i (a h_i + b_hi) if c_i < 0:
     two parallel lines with the chord's slope a, intercepts the extreme gaps of sigmoid(t) - a t
     over [h_L, h_U] (``relaxations.sigmoid_lines``);
(E4) the decoder's ReLUs: CROWN's lines on IBP's pre-activation boxes (:func:`relu_lines`),
     chosen by the sign of each coefficient (``linear_bounds.back_substitute_lower``, Zhang et
     al. 2018, Theorem 3.2);
(E5) c_j z_j = c_j mu_j + c_j e_j exp(l_j): exp(l_j) >= its tangent at the point parallel to
     its chord where c_j e_j >= 0, <= its chord elsewhere (``elbo_relaxation.latent_lines``);
(E6) through the two heads and the encoder's ReLUs (CROWN's lines on IBP's boxes) to one linear
     function w . x' + w0; its minimum over the ball, sum_i min(w_i lo_i, w_i hi_i) + w0
     (Zhang et al. 2018, Corollary 3.3), or, if larger, the minimum of the same function of
     (mu, l, x') over the (mu, l) box and the ball separately.

Sound for every x' in the ball and this noise draw, whatever the boxes, as long as each holds its
quantity (IBP's do); equal to the ELBO at eps 0 (every box a point, every line exact there, up
to float rounding). Differentiable in the model's parameters: every line's choice (sign
patterns, CROWN's lower ReLU slope) is piecewise constant, its slope and intercept are smooth in
the boxes, and no step produces a NaN gradient where the bound is finite: exp's chord and the
point of its parallel tangent are computed without overflow on wide l intervals
(``relaxations.exp_chord``, ``relaxations.exp_parallel_point``), and the ReLU lines without the
-l u / (u - l) whose overflow would (:func:`relu_lines`). Where the bound itself overflows it is
-inf (vacuous), never NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bounds import (_check_noise, _log_likelihood_scale, input_box, kl_upper_bound, latent_box,
                     reconstruction_upper_bound)
from .elbo_relaxation import _heads, _pick, kl_lines, latent_lines, vacuous_if_undefined
from .interval import Interval, propagate
from .linear_bounds import Relaxation, RelaxedNetwork, _split_layers, back_substitute_lower
from .model import VAE
from .relaxations import sigmoid_lines, square_chord


@dataclass(frozen=True)
class IbpBoxes:
    """IBP's box of every quantity the ELBO's relaxation needs, for every x' in ``ball``: the
    encoder's and the decoder's ReLU input boxes (in the two :class:`RelaxedNetwork`), mu, log
    sigma, z, h (the decoder's pre-sigmoid output: ``decoder.output``) and d = x' - g."""

    ball: Interval
    encoder: RelaxedNetwork
    mu: Interval
    log_sigma: Interval
    latent: Interval
    decoder: RelaxedNetwork
    decoded: Interval  # g = sigmoid(h)
    residual: Interval  # d = x' - g: [lo - g_U, hi - g_L]


@dataclass(frozen=True)
class CrownIbpBounds:
    """Per image [B]: IBP's certificate (``elbo_lower_bound``, bit for bit) and the linear bound of
    the ELBO on IBP's boxes (this module), from one IBP pass."""

    ibp: Tensor
    linear: Tensor

    @property
    def certificate(self) -> Tensor:
        """The larger of the two, per image: a valid lower bound too."""
        return torch.maximum(self.ibp, self.linear)


# --- IBP's boxes ------------------------------------------------------------------------------------


def relu_lines(pre: Interval) -> Relaxation:
    """CROWN's ReLU lines (``linear_bounds.relu_relaxation``: the same lower slopes, and upper
    slopes u / (u - l) bit for bit) in fewer tensor passes, for training. With l- = min(l, 0),
    u+ = max(u, 0): upper slope s = u+ / (u+ - l-) (1 active, 0 inactive, u / (u - l) unstable;
    0 on the point box l = u = 0, where every line is exact); upper intercept max(-l- s, (1 - s) u+),
    which puts the line on or above relu at both ends for any s in [0, 1] (so above it between
    them): the same number as -l u / (u - l) in exact arithmetic, and sound where u - l or l u
    overflows; lower slope 1 where u >= -l, else 0 (CROWN-Ada; 1 active, 0 inactive). Kept apart
    from ``relu_relaxation`` on purpose, for training: that one's torch.where around -l u / (u - l)
    gives a NaN gradient (0 * inf in the unselected branch) wherever -l u overflows although its
    line is finite, where this one's gradient stays finite, and this one takes about 2/3 of its
    time forward and backward."""
    negative, positive = pre.lower.clamp(max=0), pre.upper.clamp(min=0)
    width = positive - negative
    upper_slope = positive / torch.where(width > 0, width, torch.ones_like(width))
    intercept = torch.fmax(-negative * upper_slope, (1 - upper_slope) * positive)
    with torch.no_grad():
        lower_slope = (pre.upper >= -pre.lower).to(pre.lower.dtype)
    return Relaxation(lower_slope, upper_slope, intercept)


def _ibp_relaxed(layers: list[nn.Module], box: Interval) -> RelaxedNetwork:
    """IBP through ``layers`` (``provae.interval.propagate``, layer by layer: the same numbers as
    propagating the whole Sequential), with every ReLU's input box and CROWN's lines on it (:func:`relu_lines`)."""
    shapes, pre_activation, relaxations = [box.lower.shape[1:]], {}, {}
    for position, layer in enumerate(layers):
        if type(layer) is nn.ReLU:
            pre_activation[position], relaxations[position] = box, relu_lines(box)
        box = propagate(layer, box)
        shapes.append(box.lower.shape[1:])
    return RelaxedNetwork(layers, shapes, pre_activation, relaxations, box)


def ibp_boxes(model: VAE, ball: Interval, noise: Tensor) -> IbpBoxes:
    """IBP's boxes of method.md steps 1, 3 and 4 (those of ``elbo_lower_bound``), every ReLU's kept."""
    encoder_layers, _ = _split_layers(model.encoder)
    decoder_layers, output_maps = _split_layers(model.decoder)
    if [type(layer) for layer in output_maps] != [nn.Sigmoid]:
        raise TypeError("the ELBO relaxation needs a decoder ending in one Sigmoid")
    encoder = _ibp_relaxed(encoder_layers, ball)
    mu, log_sigma = propagate(model.mu_head, encoder.output), propagate(model.log_sigma_head, encoder.output)
    latent = latent_box(mu, log_sigma, noise)
    decoder = _ibp_relaxed(decoder_layers, latent)
    decoded = decoder.output.map_increasing(torch.sigmoid)
    residual = Interval(ball.lower - decoded.upper, ball.upper - decoded.lower)
    return IbpBoxes(ball, encoder, mu, log_sigma, latent, decoder, decoded, residual)


# --- The linear bound ------------------------------------------------------------------------------


def linear_elbo_function(model: VAE, boxes: IbpBoxes, noise: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """One linear lower bound of ELBO_e(x') on ``boxes`` (steps E1-E6 of the module docstring), for
    the whole minibatch at once, one coefficient map per image and layer: ``w`` [B, D] and ``w0``
    [B] with ELBO_e(x') >= w . x' + w0 for every x' in the ball (E6b), and ``by_box`` [B], the
    bound of E6a (a number: the ELBO is >= it over the ball)."""
    batch = noise.shape[0]

    def flat(box: Interval) -> Interval:
        return Interval(box.lower.flatten(1), box.upper.flatten(1))

    h, ball = flat(boxes.decoder.output), flat(boxes.ball)
    # (E1) the reconstruction, -s d^2 >= -s ((d_L + d_U) d - d_L d_U), d = x' - g:
    # direct [B, D] on x', on_g [B, D] on g, const [B]
    d = flat(boxes.residual)
    chord = square_chord(d.lower, d.upper)
    direct, on_g, const = -scale * chord.slope, scale * chord.slope, -scale * chord.intercept.sum(-1)
    # (E3) through the sigmoid, by the sign of each pixel's coefficient
    below, above = sigmoid_lines(h.lower, h.upper)
    slope, intercept = _pick(on_g >= 0, below, above)
    on_h, const = on_g * slope, const + (on_g * intercept).sum(-1)
    # (E2) -KL's lines in m = (mu, l)
    mu, log_sigma = boxes.mu, boxes.log_sigma
    on_m, extra = kl_lines(mu, log_sigma)
    const = const + extra
    # (E4) back through the decoder's body to z: [B, 1, k]
    on_z, const = back_substitute_lower(boxes.decoder, on_h.view(batch, 1, *boxes.decoder.output.lower.shape[1:]),
                                        const.unsqueeze(1))
    on_z, const = on_z[:, 0], const[:, 0]
    # (E5) z = mu + exp(l) e: exp's tangent where exp(l)'s coefficient is >= 0, its chord elsewhere
    on_latent, extra = latent_lines(on_z, log_sigma, noise)
    on_m, const = on_m + on_latent, const + extra
    # (E6a) over the (mu, l) box and the ball apart
    positive = on_m.clamp(min=0)
    m_low, m_high = torch.cat([mu.lower, log_sigma.lower], 1), torch.cat([mu.upper, log_sigma.upper], 1)
    by_box = (const + (positive * m_low + (on_m - positive) * m_high).sum(1)
              + torch.minimum(direct * ball.lower, direct * ball.upper).sum(1))
    # (E6b) through the heads and the encoder to x', then min over the ball
    on_features, extra = _heads(model, on_m)
    on_x, through_const = back_substitute_lower(boxes.encoder, on_features.unsqueeze(1), (const + extra).unsqueeze(1))
    return on_x[:, 0].flatten(1) + direct, through_const[:, 0], by_box


def linear_elbo_bound_on(model: VAE, boxes: IbpBoxes, noise: Tensor, scale: float) -> Tensor:
    """min over the ball of :func:`linear_elbo_function`: sum_i min(w_i lo_i, w_i hi_i) + w0 (in
    center/radius form), or E6a's bound where larger. [B]"""
    on_x, const, by_box = linear_elbo_function(model, boxes, noise, scale)
    ball = boxes.ball
    center, radius = ((ball.lower + ball.upper) / 2).flatten(1), ((ball.upper - ball.lower) / 2).flatten(1)
    through = const + (on_x * center).sum(1) - (on_x.abs() * radius).sum(1)
    return torch.fmax(through, by_box)


def elbo_crown_ibp_bounds(model: VAE, x: Tensor, eps: float | Tensor, noise: Tensor, sigma0: float = 1.0,
                          clip: bool = True) -> CrownIbpBounds:
    """IBP's certificate LB_e(x, eps) (method.md steps 1-6) and the linear bound of the ELBO on the
    same boxes (steps E1-E6 of the module docstring), over ``input_box(x, eps, clip)``, from one
    IBP pass; both -inf where vacuous, never NaN. For every x' in the ball, ``elbo(model, x',
    noise)`` >= each of them. Differentiable in the model's parameters."""
    _check_noise(model, x, noise)
    scale = _log_likelihood_scale(sigma0)
    ball = input_box(x, eps, clip)
    boxes = ibp_boxes(model, ball, noise)
    ibp = -scale * reconstruction_upper_bound(ball, boxes.decoded) - kl_upper_bound(boxes.mu, boxes.log_sigma)
    linear = vacuous_if_undefined(linear_elbo_bound_on(model, boxes, noise, scale))
    return CrownIbpBounds(ibp, linear)


def elbo_crown_ibp_lower_bound(model: VAE, x: Tensor, eps: float | Tensor, noise: Tensor, sigma0: float = 1.0,
                               clip: bool = True) -> Tensor:
    """The linear bound of the ELBO on IBP's boxes (:func:`elbo_crown_ibp_bounds`' ``linear``): for
    every x' in ``input_box(x, eps, clip)``, ``elbo(model, x', noise) >= LB``; equal to ``elbo``
    at eps 0 up to float rounding; -inf where vacuous. Not intersected with IBP's (training mixes
    the two; :attr:`CrownIbpBounds.certificate` is their maximum). [B]"""
    return elbo_crown_ibp_bounds(model, x, eps, noise, sigma0, clip).linear
