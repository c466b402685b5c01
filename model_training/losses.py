"""Loss functions and anomaly scores of both papers, as pure functions.

Per-sample variants (`*_per_sample`, shape [N]) are what the exported ONNX
graphs return as score terms; the training losses are their batch means.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

GP_LAMBDA = 10.0
AGE_LOSS_SCALE = 100.0  # years per unit of the training age loss (see vae_loss)
# Side of the cube the focal term averages the error map over, in model voxels
# (about 12 mm on the 64^3 head grid: the core of a 5 mL bleed fills it).
FOCAL_KERNEL = 5


def critic_wasserstein(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """E[D(G(z))] - E[D(x)] (CT paper, Eq. 2 without the penalty)."""
    return d_fake.mean() - d_real.mean()


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """L_G = -E[D(G(z))] (CT paper, Eq. 3)."""
    return -d_fake.mean()


def gradient_penalty(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    weight: float = GP_LAMBDA,
    eps: torch.Tensor | None = None,
) -> torch.Tensor:
    """weight * E[(||grad_xhat D(xhat)||_2 - 1)^2], xhat uniform on the line real-fake.

    `eps` ([N], in [0, 1]) fixes the interpolation points (tests); drawn otherwise.
    """
    if eps is None:
        eps = torch.rand(real.shape[0], device=real.device, dtype=real.dtype)
    shape = (-1,) + (1,) * (real.dim() - 1)
    x_hat = (eps.view(shape) * real + (1 - eps.view(shape)) * fake).detach().requires_grad_(True)
    scores = critic(x_hat)
    (grad,) = torch.autograd.grad(scores.sum(), x_hat, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return weight * ((norms - 1) ** 2).mean()


def critic_loss(
    critic: Callable[[torch.Tensor], torch.Tensor],
    real: torch.Tensor,
    fake: torch.Tensor,
    weight: float = GP_LAMBDA,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L_D = E[D(fake)] - E[D(real)] + lambda * GP. Returns (L_D, wasserstein term, GP)."""
    w = critic_wasserstein(critic(real), critic(fake))
    gp = gradient_penalty(critic, real, fake, weight)
    return w + gp, w, gp


def izi_f_per_sample(
    x: torch.Tensor, recon: torch.Tensor, feat_x: torch.Tensor, feat_recon: torch.Tensor, kappa: float
) -> torch.Tensor:
    """L_E per sample: (1/n)||x - G(E(x))||^2 + kappa * (1/m)||f(x) - f(G(E(x)))||^2."""
    image_term = ((x - recon) ** 2).flatten(1).mean(1)
    feature_term = ((feat_x - feat_recon) ** 2).flatten(1).mean(1)
    return image_term + kappa * feature_term


def izi_f_loss(
    x: torch.Tensor, recon: torch.Tensor, feat_x: torch.Tensor, feat_recon: torch.Tensor, kappa: float
) -> torch.Tensor:
    return izi_f_per_sample(x, recon, feat_x, feat_recon, kappa).mean()


def l1_per_sample(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Mean absolute voxel error per sample (the MR paper's L_Rec)."""
    return (x - recon).abs().flatten(1).mean(1)


def focal_per_sample(error_map: torch.Tensor, kernel: int = FOCAL_KERNEL) -> torch.Tensor:
    """Largest mean voxel error over any kernel^3 cube, per sample.

    The papers' scores average over the whole volume, where a 5 mL finding is
    ~0.1 % of the voxels and vanishes in the healthy spread; this term sees a
    compact region of high error however small the rest of the error is.
    """
    pooled = torch.nn.functional.avg_pool3d(error_map, kernel, stride=1, padding=kernel // 2,
                                            count_include_pad=True)
    return pooled.flatten(1).amax(1)


def kl_per_sample(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)), averaged over latent dimensions.

    Averaging (not summing) keeps the term on the scale of the per-voxel L1 for
    any latent size, so beta = 1 from the paper stays meaningful.
    """
    return 0.5 * (mu**2 + logvar.exp() - 1.0 - logvar).mean(1)


@dataclass(frozen=True)
class VaeLoss:
    total: torch.Tensor
    rec: torch.Tensor
    kl: torch.Tensor
    age: torch.Tensor  # mean |predicted - chronological| in years (0 without an age head)


def vae_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    predicted_age: torch.Tensor | None,
    chronological_age: torch.Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
) -> VaeLoss:
    """L = L_Rec + beta * L_KL + gamma * L_Age (MR paper, Eq. 2).

    L_Age is the L1 age error in units of AGE_LOSS_SCALE years so that it is of
    the same order as the other terms; the reported `age` stays in years.
    """
    rec = l1_per_sample(x, recon).mean()
    kl = kl_per_sample(mu, logvar).mean()
    if predicted_age is None:
        age_years = torch.zeros((), device=x.device)
    else:
        age_years = (predicted_age - chronological_age).abs().mean()
    total = rec + beta * kl + gamma * age_years / AGE_LOSS_SCALE
    return VaeLoss(total=total, rec=rec.detach(), kl=kl.detach(), age=age_years.detach())


def anomaly_score(
    rec: np.ndarray | torch.Tensor,
    kl: np.ndarray | torch.Tensor,
    age_gap: np.ndarray | torch.Tensor | None,
    alpha: float,
    beta: float,
    gamma: float,
) -> np.ndarray | torch.Tensor:
    """alpha * Rec + beta * KL + gamma * |age gap| (MR paper, Eq. 3)."""
    score = alpha * rec + beta * kl
    if age_gap is not None and gamma:
        score = score + gamma * (age_gap.abs() if isinstance(age_gap, torch.Tensor) else np.abs(age_gap))
    return score
