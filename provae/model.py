"""The paper's convolutional VAE (section 4; method.md, "Architecture").

Encoder: Conv(c->32, 4x4, s2, p1) ReLU Conv(32->64, 4x4, s2, p1) ReLU Flatten, then two
Linear heads to the latent mean and log standard deviation. Decoder: Linear(latent ->
64*(H/4)*(W/4)) ReLU Unflatten ConvT(64->32) ReLU ConvT(32->c) Sigmoid.

The paper's "fully connected layer of 3136 units" is read as the flattened 64x7x7 feature map
(4096 = 64x8x8 for CIFAR-10), not as an extra hidden layer.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from provae.datasets import DatasetSpec, dataset_names, get_dataset
from provae.files import atomic_path


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int
    image_size: int
    latent_dim: int = 50
    channels: tuple[int, int] = (32, 64)
    kernel_size: int = 4

    def __post_init__(self) -> None:
        # Two stride-2 convolutions halve the side twice; the decoder must invert that exactly.
        if self.image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {self.image_size}")
        object.__setattr__(self, "channels", tuple(self.channels))

    @property
    def feature_side(self) -> int:
        return self.image_size // 4

    @property
    def feature_dim(self) -> int:
        return self.channels[1] * self.feature_side**2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, self.image_size, self.image_size)


def config_for(spec: DatasetSpec) -> ModelConfig:
    """The paper's network for a registered dataset's images (``spec.image_shape``, (C, H, W))."""
    channels, side, _ = spec.image_shape
    return ModelConfig(in_channels=channels, image_size=side)


class _RegistryConfigs(Mapping):
    """Read-only view: dataset name -> its ``ModelConfig``, derived from the registry's image shape
    (``provae.datasets``), so an entry registered at run time is here too."""

    def __getitem__(self, name: str) -> ModelConfig:
        try:
            return config_for(get_dataset(name))
        except ValueError as error:
            raise KeyError(name) from error

    def __iter__(self) -> Iterator[str]:
        return iter(dataset_names())

    def __len__(self) -> int:
        return len(dataset_names())


DATASET_CONFIGS: Mapping[str, ModelConfig] = _RegistryConfigs()


class VAE(nn.Module):
    """Gaussian VAE whose layers are all plain ``nn`` modules, so IBP can walk them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        k = config.kernel_size
        self.encoder = nn.Sequential(
            nn.Conv2d(config.in_channels, c1, k, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(c1, c2, k, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
        )
        self.mu_head = nn.Linear(config.feature_dim, config.latent_dim)
        self.log_sigma_head = nn.Linear(config.feature_dim, config.latent_dim)
        self.decoder = nn.Sequential(
            nn.Linear(config.latent_dim, config.feature_dim),
            nn.ReLU(),
            nn.Unflatten(1, (c2, config.feature_side, config.feature_side)),
            nn.ConvTranspose2d(c2, c1, k, stride=2, padding=1),
            nn.ReLU(),
            nn.ConvTranspose2d(c1, config.in_channels, k, stride=2, padding=1),
            nn.Sigmoid(),
        )

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log standard deviation of q(z|x), each [B, latent_dim]."""
        features = self.encoder(x)
        return self.mu_head(features), self.log_sigma_head(features)

    def decode(self, z: Tensor) -> Tensor:
        """Mean of p(x|z), in [0, 1], shaped like the images."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction at the posterior mean (what figures show)."""
        mu, _ = self.encode(x)
        return self.decode(mu)


def make_model(dataset: str, **overrides) -> VAE:
    """A freshly initialised VAE for a registered dataset (``provae.datasets``, e.g. ``"mnist"``);
    ``overrides`` change config fields; an unknown name raises "unknown dataset 'x'; known: [...]"."""
    base = config_for(get_dataset(dataset))
    config = ModelConfig(**{**base.__dict__, **overrides})
    return VAE(config)


@dataclass
class Checkpoint:
    model: VAE
    metadata: dict = field(default_factory=dict)


def save_checkpoint(path, model: VAE, metadata: dict | None = None) -> None:
    """Weights plus the config that rebuilds the model and free-form training metadata.

    Written to a side file first, then renamed: a crash never leaves a truncated checkpoint.
    """
    with atomic_path(path) as partial:  # a path, not a handle: torch names the archive after the file
        torch.save(
            {"config": dict(model.config.__dict__), "state_dict": model.state_dict(), "metadata": metadata or {}},
            partial,
        )


def load_checkpoint(path, map_location: str | torch.device = "cpu") -> Checkpoint:
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = VAE(ModelConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return Checkpoint(model=model, metadata=payload["metadata"])


def load_model(path, map_location: str | torch.device = "cpu") -> VAE:
    """Rebuild a trained model from a checkpoint written by :func:`save_checkpoint`."""
    return load_checkpoint(path, map_location).model
