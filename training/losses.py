"""Diffusion training objective: offset noise, uniform timesteps, v-prediction target, SNR-weighted MSE.

The weighting is min(SNR + 1, gamma) / (SNR + 1) *per sample* (Min-SNR for v-prediction). The official
stage-2 code averages the loss over the batch before weighting, so it effectively multiplies the mean
loss by the mean weight (docs/model.md §6.2, docs/release_quirks.md §21); here each sample's loss gets its own weight.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler


def offset_noise(shape: tuple[int, ...], offset: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """randn(shape) + offset * randn(batch, channels, 1, ...): one extra constant per sample and channel,
    shared by every frame and pixel (noise offset, 0.05 in both EmoCAST stages)."""
    noise = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if offset:
        per_channel = (shape[0], shape[1]) + (1,) * (len(shape) - 2)
        noise = noise + offset * torch.randn(per_channel, generator=generator, device=device, dtype=dtype)
    return noise


def sample_timesteps(batch: int, scheduler: DDIMScheduler, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """Uniform integer timesteps in [0, num_train_timesteps)."""
    return torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator,
                         device=device, dtype=torch.long)


def snr(scheduler: DDIMScheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar), in fp32 (0 at the zero-terminal-SNR step t = T - 1)."""
    alpha_bar = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr_values: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR + 1, gamma) / (SNR + 1): Min-SNR-gamma for a v-prediction target (hence the +1)."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma must be positive, got {gamma}")
    snr_plus_one = snr_values.float() + 1.0
    return torch.clamp(snr_plus_one, max=gamma) / snr_plus_one


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per batch element, in fp32: (B,)."""
    if prediction.shape != target.shape:
        raise ValueError(f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} differ in shape")
    return F.mse_loss(prediction.float(), target.float(), reduction="none").flatten(1).mean(dim=1)


@dataclass
class DiffusionTargets:
    noisy: torch.Tensor  # x_t
    target: torch.Tensor  # v
    timesteps: torch.Tensor  # (B,) long
    weights: torch.Tensor  # (B,) fp32 loss weights


def diffusion_targets(scheduler: DDIMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                      timesteps: torch.Tensor, snr_gamma: float | None) -> DiffusionTargets:
    """Noisy latents and the v-prediction target from the training scheduler; `snr_gamma` None: weight 1."""
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError(f"EmoCAST trains a v-prediction model, the scheduler predicts "
                         f"{scheduler.config.prediction_type!r}; use make_training_scheduler()")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    target = scheduler.get_velocity(latents, noise, timesteps)
    weights = (torch.ones(latents.shape[0], device=latents.device) if snr_gamma is None
               else min_snr_weights(snr(scheduler, timesteps), snr_gamma))
    return DiffusionTargets(noisy, target, timesteps, weights)


def weighted_loss(prediction: torch.Tensor, targets: DiffusionTargets) -> tuple[torch.Tensor, torch.Tensor]:
    """(scalar loss, per-sample weighted losses (B,)): each sample's MSE times its own weight, averaged."""
    per_sample = per_sample_mse(prediction, targets.target) * targets.weights
    return per_sample.mean(), per_sample.detach()
