"""Training on the certified bound (paper Algorithm 1, made to converge; method.md, "Training")."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor

from .bounds import check_eps, elbo, elbo_lower_bound
from .files import atomic_path
from .model import VAE


@dataclass(frozen=True)
class EpsSchedule:
    """eps as a function of training progress, in (fractional) epochs.

    ``warmup_epochs`` at eps = 0, then a linear ramp over ``ramp_epochs`` up to ``eps_train``,
    then constant: the IBP schedule of Gowal et al. 2018 (also used by CROWN-IBP, Zhang et al.
    2020). Starting at the full eps leaves IBP training stuck (method.md).
    """

    eps_train: float
    warmup_epochs: float = 0.0
    ramp_epochs: float = 0.0

    def __post_init__(self) -> None:
        check_eps(self.eps_train)
        if self.warmup_epochs < 0 or self.ramp_epochs < 0:
            raise ValueError(f"warm-up and ramp lengths must be >= 0, got {self.warmup_epochs}, {self.ramp_epochs}")

    def __call__(self, progress: float) -> float:
        if progress < self.warmup_epochs:
            return 0.0
        if self.ramp_epochs == 0:
            return self.eps_train
        return self.eps_train * min(1.0, (progress - self.warmup_epochs) / self.ramp_epochs)


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the model is not saved."""


def minibatches(data: Tensor, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Shuffled mini-batches of an in-memory tensor (cheaper than a DataLoader for small images).

    The order is drawn on the CPU (the same on every device) and moved once per epoch.
    """
    order = torch.randperm(data.shape[0], generator=generator).to(data.device)
    for start in range(0, data.shape[0], batch_size):
        yield data[order[start : start + batch_size]]


BOUNDS = ("ibp", "elbo_crown")


def crown_ibp_weight(schedule: EpsSchedule, progress: float, final: float = 0.0) -> float:
    """k, the weight of the "elbo_crown" bound in the objective at ``progress`` (fractional epochs):
    1 until the eps ramp starts, then linear to ``final`` at its end, then ``final`` (CROWN-IBP's
    beta, 1 -> 0 over the ramp: Zhang et al. 2020, section 3). The tighter bound steers the early,
    small-eps training, where IBP's boxes are loosest relative to the ELBO; at eps_train the
    objective is IBP's bound again (``final`` 0), the certificate the pipeline reports. Without a
    ramp (``ramp_epochs`` 0) eps jumps at the end of the warm-up, and so does k. During the warm-up
    eps is 0, where every bound is the ELBO and k does not matter."""
    if not 0.0 <= final <= 1.0:
        raise ValueError(f"final must lie in [0, 1], got {final}")
    if progress < schedule.warmup_epochs:
        return 1.0
    if schedule.ramp_epochs == 0:
        return final
    fraction = min(1.0, (progress - schedule.warmup_epochs) / schedule.ramp_epochs)
    return 1.0 - (1.0 - final) * fraction


def training_objective(
    model: VAE, x: Tensor, eps: float, noise: Tensor, sigma0: float, clean_weight: float = 0.0, clip: bool = True,
    bound: str = "ibp", mix: float = 1.0,
) -> Tensor:
    """Per-example objective to maximise: (1 - w) * LB + w * ELBO_e(x), w = clean_weight.

    ``bound`` "ibp" (the default): LB = LB_e(x, eps), IBP's certificate (method.md steps 1-6).
    "elbo_crown": LB = mix * LB_crown + (1 - mix) * LB_e(x, eps), LB_crown the linear bound of the
    ELBO itself on IBP's boxes (``provae.elbo_crown``; CROWN-IBP, Zhang et al. 2020), both from one
    IBP pass; with mix 0 it is IBP's alone (the same numbers as "ibp"). Every LB is a lower bound
    of ELBO_e(x') over the ball, and so is their mix. ``mix`` is ignored with "ibp".

    At eps = 0 the bound *is* the ELBO, so the cheaper plain forward pass is used.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if not 0.0 <= clean_weight <= 1.0:
        raise ValueError(f"clean_weight must lie in [0, 1], got {clean_weight}")
    if bound == "elbo_crown" and not 0.0 <= mix <= 1.0:
        raise ValueError(f"mix must lie in [0, 1], got {mix}")
    if eps == 0.0 or clean_weight == 1.0:
        return elbo(model, x, noise, sigma0)
    if bound == "ibp" or mix == 0.0:
        lower = elbo_lower_bound(model, x, eps, noise, sigma0, clip)
    else:
        from .elbo_crown import elbo_crown_ibp_bounds  # here: the "ibp" path (the train stage's) imports none of it

        both = elbo_crown_ibp_bounds(model, x, eps, noise, sigma0, clip)
        lower = both.linear if mix == 1.0 else mix * both.linear + (1.0 - mix) * both.ibp
    if clean_weight == 0.0:
        return lower
    return (1.0 - clean_weight) * lower + clean_weight * elbo(model, x, noise, sigma0)


def train_epoch(
    model: VAE,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Tensor],
    schedule: EpsSchedule,
    *,
    epoch: int,
    steps_per_epoch: int,
    sigma0: float = 1.0,
    clean_weight: float = 0.0,
    clip: bool = True,
    generator: torch.Generator | None = None,
    bound: str = "ibp",
    final_mix: float = 0.0,
) -> dict[str, float]:
    """One epoch of gradient ascent on the mean objective; eps follows ``schedule`` per step.

    ``bound``: the objective's lower bound (:func:`training_objective`); with "elbo_crown" its
    weight k follows :func:`crown_ibp_weight` (1 at the start of the ramp, ``final_mix`` at its
    end) per step. Returns the epoch's mean objective and the eps reached (and, with
    "elbo_crown", the last step's k as "mix"). A non-finite loss raises
    :class:`NonFiniteLossError` naming the epoch and batch. On the CPU it is caught before any
    parameter is touched; on a GPU the check waits for the end of the epoch, since reading a loss
    back every step would stall the device (the model is then never saved either way).
    ``generator`` draws the noise and must live on the model's device.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    model.train()
    check_each_step = next(model.parameters()).device.type == "cpu"
    total, count, eps, losses, mix = 0.0, 0, schedule(epoch), [], None
    for step, x in enumerate(batches):
        eps = schedule(epoch + step / steps_per_epoch)
        noise = torch.randn((x.shape[0], model.latent_dim), generator=generator, device=x.device)
        mix = crown_ibp_weight(schedule, epoch + step / steps_per_epoch, final_mix) if bound != "ibp" else 1.0
        objective = training_objective(model, x, eps, noise, sigma0, clean_weight, clip, bound, mix)
        loss = -objective.mean()
        if check_each_step and not torch.isfinite(loss):
            raise _non_finite(loss.item(), epoch, step, eps)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total = total + objective.detach().sum()
        count += x.shape[0]
        losses.append(loss.detach())
    if losses and not check_each_step:
        finite = torch.isfinite(torch.stack(losses))
        if not bool(finite.all()):
            step = int((~finite).nonzero()[0])
            raise _non_finite(losses[step].item(), epoch, step, schedule(epoch + step / steps_per_epoch))
    stats = {"objective": float(total) / max(count, 1), "eps": eps}
    if bound != "ibp":
        stats["mix"] = crown_ibp_weight(schedule, epoch, final_mix) if mix is None else mix
    return stats


def _non_finite(loss: float, epoch: int, step: int, eps: float) -> NonFiniteLossError:
    return NonFiniteLossError(
        f"non-finite training loss ({loss}) at epoch {epoch}, batch {step} (eps={eps:.4g}); "
        "try a lower learning rate or a longer eps warm-up/ramp"
    )


@dataclass
class TrainingState:
    """What an interrupted training run needs to continue exactly where it stopped."""

    epochs_done: int
    model_state: dict
    optimizer_state: dict
    generator_states: dict[str, Tensor]  # name -> torch.Generator.get_state()
    history: list[dict[str, float]]  # the metrics logged after each completed epoch
    fingerprint: dict  # the run's settings: a state from other settings is never resumed


def save_training_state(path, state: TrainingState) -> None:
    """Written to a side file, then renamed: a run killed while saving keeps the previous state."""
    with atomic_path(path) as partial:
        torch.save(state.__dict__, partial)


def load_training_state(path, fingerprint: dict) -> tuple[TrainingState | None, str]:
    """The saved state if it exists and belongs to a run with this ``fingerprint``; else None and why."""
    path = Path(path)
    if not path.is_file():
        return None, f"no saved state at {path}"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        state = TrainingState(**payload)
    except Exception as error:  # a truncated or foreign file: start afresh rather than fail
        return None, f"{path} is unreadable ({type(error).__name__}: {error})"
    if state.fingerprint != fingerprint:
        changed = sorted(k for k in {**fingerprint, **state.fingerprint} if fingerprint.get(k) != state.fingerprint.get(k))
        return None, f"{path} belongs to a run with other settings ({', '.join(changed)})"
    return state, f"resuming after epoch {state.epochs_done} from {path}"


@torch.no_grad()
def mean_bound_and_elbo(
    model: VAE,
    data: Tensor,
    eps: float,
    *,
    batch_size: int = 500,
    noise_samples: int = 1,
    sigma0: float = 1.0,
    clip: bool = True,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Dataset means of LB_e(x, eps) and ELBO_e(x) with the same draws, averaged over ``noise_samples``."""
    model.eval()
    bound_sum, elbo_sum = 0.0, 0.0
    for start in range(0, data.shape[0], batch_size):
        x = data[start : start + batch_size]
        for _ in range(noise_samples):
            noise = torch.randn((x.shape[0], model.latent_dim), generator=generator, device=x.device)
            bound_sum += elbo_lower_bound(model, x, eps, noise, sigma0, clip).sum().item()
            elbo_sum += elbo(model, x, noise, sigma0).sum().item()
    n = data.shape[0] * noise_samples
    result = {"bound": bound_sum / n, "elbo": elbo_sum / n}
    if not all(math.isfinite(v) for v in result.values()):
        raise NonFiniteLossError(f"non-finite evaluation at eps={eps}: {result}")
    return result
