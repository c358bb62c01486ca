"""provae: provably robust VAEs (Condessa & Kolter, 2020), with a sound IBP certificate of the ELBO.

The public names below load their module on first use, so ``import provae.data`` (say) does not
import the attacks: DVC stages then depend exactly on the modules they import.
"""

from importlib import import_module

_EXPORTS = {
    "provae.model": ["VAE", "ModelConfig", "make_model", "load_model", "load_checkpoint", "save_checkpoint"],
    "provae.interval": ["Interval", "propagate"],
    "provae.bounds": ["elbo", "elbo_lower_bound", "input_box", "kl_divergence", "kl_upper_bound"],
    "provae.attacks": ["apgd_attack", "apgd_minimize", "attack_starts", "pgd_attack", "latent_attack", "worst_of",
                       "expected_elbo", "mean_elbo_over", "WorstCase"],
    "provae.linear_bounds": ["linear_bounds", "encoder_intervals", "decoder_interval", "crown_elbo_lower_bound"],
    "provae.datasets": ["DatasetSpec", "register", "get_dataset", "dataset_names"],
    "provae.training": ["EpsSchedule", "train_epoch", "minibatches", "mean_bound_and_elbo", "NonFiniteLossError"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'provae' has no attribute {name!r}")
    return getattr(import_module(_MODULE_OF[name]), name)


def __dir__():
    return __all__
