"""3D networks for the two methods, implemented from the papers' descriptions.

f-AnoGAN (Simarro Viana et al.): generator and critic after the 3D alpha-GAN
brain generator of Kwon et al. 2019 (a latent vector is projected to a 4^3
feature volume, then each transposed-conv block doubles the size up to the
image; the critic mirrors it with strided convolutions). The critic has no
batch norm because the gradient penalty is defined per sample; it uses a
per-sample layer norm (GroupNorm with one group). The encoder mirrors the critic
and ends in tanh, as the paper adds.

VAE with brain age (Bengs, Behrendt et al.): a 3D convolutional VAE with three
variants: "vae"; "vae_ac" (latent multiplied element-wise by the chronological
age); "vae_ap" (an age regression head branching off before the latent).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

# Ages enter and leave the networks in units of AGE_SCALE years (and the age
# head predicts around AGE_CENTER) so that the a_c product and the regression
# target stay near 1 and training does not first spend steps finding the mean.
AGE_SCALE = 100.0
AGE_CENTER = 50.0
VAE_VARIANTS = ("vae", "vae_ac", "vae_ap")


@dataclass(frozen=True)
class GanPreset:
    size: int
    latent: int
    channels: tuple[int, ...]  # critic/encoder channels from full resolution down to 4^3


@dataclass(frozen=True)
class VaePreset:
    latent: int
    channels: tuple[int, ...]  # encoder channels per stride-2 stage
    age_hidden: int


GAN_PRESETS: dict[str, GanPreset] = {
    # Paper-sized: 64^3, latent 2500, Kwon et al. channel widths. GPU only.
    "paper": GanPreset(size=64, latent=2500, channels=(64, 128, 256, 512)),
    # Trains on two CPU cores in minutes.
    "compact": GanPreset(size=64, latent=128, channels=(8, 16, 32, 32)),
}

VAE_PRESETS: dict[str, VaePreset] = {
    "paper": VaePreset(latent=2048, channels=(32, 64, 128, 256), age_hidden=256),
    "compact": VaePreset(latent=128, channels=(8, 16, 32, 32), age_hidden=64),
}


def _stages_for(size: int) -> int:
    stages = math.log2(size / 4)
    if size < 8 or stages != int(stages):
        raise ValueError(f"size must be 4 * 2^k with k >= 1, got {size}")
    return int(stages)


def _layer_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(1, channels)


class Generator(nn.Module):
    """z [N, latent] -> image [N, 1, S, S, S] in [-1, 1]."""

    def __init__(self, size: int, latent: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        stages = _stages_for(size)
        if len(channels) != stages:
            raise ValueError(f"channels needs {stages} entries for size {size}, got {len(channels)}")
        self.latent = latent
        self.base = channels[-1]
        self.project = nn.Sequential(nn.Linear(latent, self.base * 64), nn.BatchNorm1d(self.base * 64), nn.ReLU())
        ups: list[nn.Module] = []
        widths = list(reversed(channels))  # 4^3 -> full resolution
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            ups += [nn.ConvTranspose3d(c_in, c_out, 4, 2, 1, bias=False), nn.BatchNorm3d(c_out), nn.ReLU()]
        ups += [nn.ConvTranspose3d(widths[-1], 1, 4, 2, 1), nn.Tanh()]
        self.up = nn.Sequential(*ups)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, self.base, 4, 4, 4)
        return self.up(h)


def _down_stack(channels: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 1
    for c_out in channels:
        layers += [nn.Conv3d(c_in, c_out, 4, 2, 1), _layer_norm(c_out), nn.LeakyReLU(0.2)]
        c_in = c_out
    return nn.Sequential(*layers)


class Critic(nn.Module):
    """image -> unbounded realness score [N]; `features` is f(x) of the izi_f loss."""

    def __init__(self, size: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        if len(channels) != _stages_for(size):
            raise ValueError(f"channels needs {_stages_for(size)} entries for size {size}")
        self.down = _down_stack(channels)
        self.head = nn.Linear(channels[-1] * 64, 1)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The intermediate layer (last conv block, 4^3) used as f in L_feat."""
        return self.down(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x)).squeeze(1)


class Encoder(nn.Module):
    """image -> z [N, latent] in (-1, 1) (tanh, as in the CT paper)."""

    def __init__(self, size: int, latent: int, channels: tuple[int, ...]) -> None:
        super().__init__()
        if len(channels) != _stages_for(size):
            raise ValueError(f"channels needs {_stages_for(size)} entries for size {size}")
        self.down = _down_stack(channels)
        self.head = nn.Linear(channels[-1] * 64, latent)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.head(self.down(x).flatten(1)))


def build_fanogan(preset: GanPreset) -> tuple[Generator, Critic, Encoder]:
    return (
        Generator(preset.size, preset.latent, preset.channels),
        Critic(preset.size, preset.channels),
        Encoder(preset.size, preset.latent, preset.channels),
    )


@dataclass(frozen=True)
class VaeOutput:
    recon: torch.Tensor
    mu: torch.Tensor
    logvar: torch.Tensor
    age: torch.Tensor | None  # predicted age in years (vae_ap only)


class VAE3D(nn.Module):
    """3D VAE on a fixed grid (D, H, W); the input is zero-padded to a multiple of
    2^stages inside the network and the reconstruction cropped back, so any
    preprocessing grid works and the exported graph still has static shapes."""

    def __init__(self, shape: tuple[int, int, int], preset: VaePreset, variant: str = "vae_ap") -> None:
        super().__init__()
        if variant not in VAE_VARIANTS:
            raise ValueError(f"variant must be one of {VAE_VARIANTS}, got {variant!r}")
        self.shape = tuple(int(s) for s in shape)
        self.variant = variant
        self.latent = preset.latent
        factor = 2 ** len(preset.channels)
        self.padded = tuple(int(math.ceil(s / factor) * factor) for s in self.shape)
        self.bottom = tuple(p // factor for p in self.padded)
        self.base = preset.channels[-1]
        flat = self.base * math.prod(self.bottom)
        self.down = _down_stack(preset.channels)
        self.to_mu = nn.Linear(flat, preset.latent)
        self.to_logvar = nn.Linear(flat, preset.latent)
        # The age branch leaves the encoder before the latent (VAE-a_p). It also sees
        # each encoder stage's spatial mean: atrophy is a whole-brain change in how
        # much tissue turns to CSF, which a mean measures directly from few subjects.
        head_in = flat + sum(preset.channels)
        # Batch norm first: subjects differ in these features by a few percent of
        # their size, and standardising them lets the head learn that in few steps.
        self.age_head = (
            nn.Sequential(nn.BatchNorm1d(head_in), nn.Linear(head_in, preset.age_hidden), nn.LeakyReLU(0.2),
                          nn.Linear(preset.age_hidden, 1))
            if variant == "vae_ap"
            else None
        )
        self.project = nn.Linear(preset.latent, flat)
        ups: list[nn.Module] = []
        widths = list(reversed(preset.channels))
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            ups += [nn.ConvTranspose3d(c_in, c_out, 4, 2, 1), _layer_norm(c_out), nn.LeakyReLU(0.2)]
        last = max(widths[-1] // 2, 1)
        ups += [nn.ConvTranspose3d(widths[-1], last, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv3d(last, 1, 3, 1, 1)]
        self.up = nn.Sequential(*ups)

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        pads: list[int] = []
        for size, target in zip(reversed(self.shape), reversed(self.padded)):
            pads += [0, target - size]
        return F.pad(x, pads)

    def encoder_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The flattened bottom of the encoder, and what the age head reads: that
        bottom with each stage's spatial mean appended."""
        h = self._pad(x)
        stage_means = []
        for layer in self.down:
            h = layer(h)
            if isinstance(layer, nn.LeakyReLU):
                stage_means.append(h.mean(dim=(2, 3, 4)))
        h = h.flatten(1)
        return h, torch.cat([h, *stage_means], dim=1)

    def age_from_features(self, features: torch.Tensor) -> torch.Tensor:
        if self.age_head is None:
            raise ValueError(f"variant {self.variant} has no age head")
        return AGE_CENTER + self.age_head(features).squeeze(1) * AGE_SCALE

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        h, features = self.encoder_features(x)
        age = self.age_from_features(features) if self.age_head is not None else None
        return self.to_mu(h), self.to_logvar(h), age

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.project(z).view(-1, self.base, *self.bottom)
        d, hh, w = self.shape
        return self.up(h)[:, :, :d, :hh, :w]

    def forward(
        self, x: torch.Tensor, chronological_age: torch.Tensor | None = None, sample: bool = True
    ) -> VaeOutput:
        mu, logvar, age = self.encode(x)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if sample else mu
        if self.variant == "vae_ac":
            if chronological_age is None:
                raise ValueError("variant vae_ac needs chronological_age")
            z = z * (chronological_age / AGE_SCALE).unsqueeze(1)
        return VaeOutput(recon=self.decode(z), mu=mu, logvar=logvar, age=age)
