"""provae: provably robust VAEs (Condessa & Kolter, 2020), with a sound IBP certificate of the ELBO."""

from .attacks import WorstCase, expected_elbo, latent_attack, pgd_attack, worst_of
from .elbo import elbo, elbo_lower_bound, input_box, kl_divergence, kl_upper_bound
from .interval import Interval, propagate
from .model import VAE, ModelConfig, load_checkpoint, load_model, make_model, save_checkpoint
from .training import EpsSchedule, NonFiniteLossError, mean_bound_and_elbo, minibatches, train_epoch

__all__ = [
    "VAE", "ModelConfig", "make_model", "load_model", "load_checkpoint", "save_checkpoint",
    "Interval", "propagate",
    "elbo", "elbo_lower_bound", "input_box", "kl_divergence", "kl_upper_bound",
    "pgd_attack", "latent_attack", "worst_of", "expected_elbo", "WorstCase",
    "EpsSchedule", "train_epoch", "minibatches", "mean_bound_and_elbo", "NonFiniteLossError",
]
