"""The two EmoCAST training stages (docs/model.md §6.3, §6.4): what trains, and one loss evaluation.

Stage 1 (image level) trains the reference UNet, the spatial denoising UNet (no motion / audio modules),
the FaceLocator and the face projection (the decoupled `to_k_ip` / `to_v_ip` included) on single frames.
Stage 2 (video level) trains only the audio projection and every audio and motion module.

Departures from the official scripts, on purpose (docs/release_quirks.md §21):
* reference features and contexts are paired per sample (`ReferencePairing`), never tiled across the batch;
* dropouts are drawn per sample rather than once per batch;
* the SNR weighting is applied per sample (see :mod:`training.losses`);
* a stage-2 "uncond image" sample loses the reference attention but keeps its motion-frame prefix (as the
  unconditional half does at inference) instead of getting 4 zero frames from an empty bank.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from torch import nn

from emocast_core.config import NetConfig
from emocast_core.emotion import UNCOND_PROMPT, PromptEncoder
from emocast_core.models.denoising_unet import AudioAttentionInputs
from emocast_core.models.net import (AUDIO_PROJECTION, DENOISING_UNET, FACE_LOCATOR, FACE_PROJECTION, REFERENCE_UNET,
                                     EmoCASTNet)
from emocast_core.models.reference_attention import ReferencePairing, ReferenceReader

from .losses import diffusion_targets, offset_noise, sample_timesteps, weighted_loss

STAGES = (1, 2)
STAGE1_MODULES = (REFERENCE_UNET, DENOISING_UNET, FACE_LOCATOR, FACE_PROJECTION)
STAGE2_MODULES = (AUDIO_PROJECTION,)
FRAME_MODULES = ("audio_modules", "motion_modules")


# ---- what trains ---------------------------------------------------------------------------------

def stage1_net_config(config: NetConfig) -> NetConfig:
    """The stage-1 network: the same UNets without motion and audio modules."""
    return dataclasses.replace(config, use_motion_module=False, use_audio_module=False)


def in_frame_module(name: str) -> bool:
    """Whether a parameter name lies under an audio or motion module (the stage-2 additions)."""
    return any(part in FRAME_MODULES for part in name.split("."))


def is_trainable(name: str, stage: int) -> bool:
    """Stage 1: reference UNet, spatial denoising UNet, FaceLocator, face projection. Stage 2: the audio
    projection and every parameter under an `audio_modules` / `motion_modules` path."""
    top = name.split(".", 1)[0]
    if stage == 1:
        return top in STAGE1_MODULES and not in_frame_module(name)
    if stage == 2:
        return top in STAGE2_MODULES or in_frame_module(name)
    raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")


def trainable_parameter_names(net: nn.Module, stage: int) -> list[str]:
    return [name for name, _ in net.named_parameters() if is_trainable(name, stage)]


def configure_trainable(net: nn.Module, stage: int) -> list[nn.Parameter]:
    """Set `requires_grad` for the stage and return the trainable parameters, in module order."""
    names = trainable_parameter_names(net, stage)
    if stage == 2 and not any(in_frame_module(name) for name in names):
        raise ValueError("stage 2 trains the motion and audio modules, but this network has none: build it "
                         "with use_motion_module / use_audio_module on (a stage-1 network cannot be used)")
    wanted = set(names)
    trainable = []
    for name, param in net.named_parameters():
        param.requires_grad_(name in wanted)
        if name in wanted:
            trainable.append(param)
    return trainable


# ---- dropouts ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage1Settings:
    uncond_ratio: float = 0.1
    uncond_text: bool = True
    uncond_face_locator: bool = False
    noise_offset: float = 0.05
    snr_gamma: float | None = 5.0


@dataclass(frozen=True)
class Stage2Settings:
    uncond_image_ratio: float = 0.05
    uncond_audio_ratio: float = 0.05
    start_ratio: float = 0.05
    noise_offset: float = 0.05
    snr_gamma: float | None = 5.0
    branch_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # pose, face, lip


@dataclass(frozen=True)
class Dropouts:
    """Per-sample boolean masks (B,): stage 1 uses `uncond`; stage 2 `image`, `audio`, `start`."""

    uncond: torch.Tensor | None = None
    image: torch.Tensor | None = None
    audio: torch.Tensor | None = None
    start: torch.Tensor | None = None

    def counts(self) -> dict[str, int]:
        return {name: int(mask.sum()) for name in ("uncond", "image", "audio", "start")
                if (mask := getattr(self, name)) is not None}


def _bernoulli(batch: int, p: float, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a dropout probability must be in [0, 1], got {p}")
    return torch.rand(batch, generator=generator, device=device) < p


def draw_stage1_dropouts(batch: int, settings: Stage1Settings, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> Dropouts:
    return Dropouts(uncond=_bernoulli(batch, settings.uncond_ratio, generator, torch.device(device)))


def draw_stage2_dropouts(batch: int, settings: Stage2Settings, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> Dropouts:
    """Three independent per-sample draws (the official `uncond_ia_ratio` is unused there, so not here)."""
    device = torch.device(device)
    return Dropouts(image=_bernoulli(batch, settings.uncond_image_ratio, generator, device),
                    audio=_bernoulli(batch, settings.uncond_audio_ratio, generator, device),
                    start=_bernoulli(batch, settings.start_ratio, generator, device))


# ---- shared pieces -------------------------------------------------------------------------------

@dataclass
class TrainingModels:
    """The trained networks and the frozen helpers of one stage."""

    net: EmoCASTNet
    vae: AutoencoderKL
    text_encoder: PromptEncoder
    scheduler: DDIMScheduler

    def __post_init__(self) -> None:
        self._uncond: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype

    def encode_text(self, texts: Sequence[str]) -> torch.Tensor:
        """(B, 77, D) CLIP embeddings of the descriptions, in the network's device and dtype."""
        return self.text_encoder.encode(list(texts)).to(self.device, self.dtype)

    def uncond_text(self) -> torch.Tensor:
        """(1, 77, D) CLIP(""): the unconditional text of inference."""
        if self._uncond is None:
            self._uncond = self.encode_text([UNCOND_PROMPT])
        return self._uncond

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8): a *sample* of the VAE posterior, scaled (as trained)."""
        vae_dtype = next(self.vae.parameters()).dtype
        latents = self.vae.encode(images.to(self.device, vae_dtype)).latent_dist.sample(generator)
        return (latents * self.vae.config.scaling_factor).to(self.dtype)


def _grad_if_trainable(module: nn.Module):
    """No autograd graph through a module that has nothing to train (frozen helpers of a stage)."""
    return nullcontext() if any(p.requires_grad for p in module.parameters()) else torch.no_grad()


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, differentiable
    per_sample: torch.Tensor  # (B,) weighted losses, detached
    timesteps: torch.Tensor  # (B,)
    weights: torch.Tensor  # (B,) SNR weights
    dropouts: Dropouts


def _noise_and_targets(models: TrainingModels, latents: torch.Tensor, noise_offset: float,
                       snr_gamma: float | None, generator: torch.Generator | None):
    noise = offset_noise(tuple(latents.shape), noise_offset, generator, latents.device, latents.dtype)
    timesteps = sample_timesteps(latents.shape[0], models.scheduler, generator, latents.device)
    return diffusion_targets(models.scheduler, latents, noise, timesteps, snr_gamma)


def _batch_tensor(batch: Mapping, key: str, models: TrainingModels) -> torch.Tensor:
    try:
        value = batch[key]
    except KeyError:
        raise KeyError(f"training batch has no {key!r} entry (got {sorted(batch)})") from None
    return value.to(models.device, models.dtype)


# ---- stage 1 -------------------------------------------------------------------------------------

def stage1_step(models: TrainingModels, batch: Mapping, settings: Stage1Settings,
                generator: torch.Generator | None = None, dropouts: Dropouts | None = None) -> StepResult:
    """Loss of one stage-1 batch (keys of :class:`training.data.datasets.Stage1Dataset`).

    Unconditional samples (probability `uncond_ratio`): zero identity before the face projection, no
    reference attention (the ReferenceNet does not see them), and the empty prompt if `uncond_text`."""
    net = models.net
    target = _batch_tensor(batch, "target", models)
    b = target.shape[0]
    drops = dropouts or draw_stage1_dropouts(b, settings, generator, models.device)
    keep = ~drops.uncond.to(models.device)
    latents = models.encode_images(target, generator).unsqueeze(2)  # (B, 4, 1, h, w)

    text = models.encode_text(batch["text"])
    if settings.uncond_text:
        text = torch.where(keep[:, None, None], text, models.uncond_text())
    identity = _batch_tensor(batch, "identity", models) * keep[:, None].to(models.dtype)
    with _grad_if_trainable(net.imageproj):
        context = torch.cat([text, net.imageproj(identity)], dim=1)
    with _grad_if_trainable(net.face_locator):
        face_features = net.face_locator(_batch_tensor(batch, "face_region", models))
    if settings.uncond_face_locator:
        face_features = face_features * keep[:, None, None, None].to(face_features.dtype)

    reader = None
    kept = keep.nonzero().flatten().tolist()
    if kept:
        references = models.encode_images(_batch_tensor(batch, "reference", models)[kept], generator)
        with _grad_if_trainable(net.reference_unet):
            bank = net.reference_unet(references, context[kept], 0)
        pairing = ReferencePairing.for_samples(keep.tolist(), frames=1, motion_frames=0, bank_samples=kept)
        reader = ReferenceReader(bank, pairing)

    targets = _noise_and_targets(models, latents, settings.noise_offset, settings.snr_gamma, generator)
    prediction = net.denoising_unet(targets.noisy, targets.timesteps, context, AudioAttentionInputs(),
                                    face_features=face_features, reference=reader)
    loss, per_sample = weighted_loss(prediction, targets)
    return StepResult(loss, per_sample, targets.timesteps, targets.weights, drops)


# ---- stage 2 -------------------------------------------------------------------------------------

def frame_masks(masks: Mapping[str, Sequence[torch.Tensor]], frames: int, device: torch.device,
                dtype: torch.dtype) -> list[list[torch.Tensor]]:
    """Collated masks {pose, face, lip: [(B, L) per level]} -> the UNet's per-row (B*F, L) lists."""
    try:
        return [[level.to(device, dtype).repeat_interleave(frames, 0) for level in masks[name]]
                for name in ("pose", "face", "lip")]
    except KeyError as exc:
        raise KeyError(f"stage-2 batch masks need 'pose', 'face' and 'lip' entries, missing {exc}") from None


def stage2_step(models: TrainingModels, batch: Mapping, settings: Stage2Settings,
                generator: torch.Generator | None = None, dropouts: Dropouts | None = None) -> StepResult:
    """Loss of one stage-2 batch (keys of :class:`training.data.datasets.Stage2Dataset`).

    `image` dropout: no reference attention; `audio`: zero audio tokens after the projection; `start`:
    the motion frames are zeroed in pixel space (mid-grey) before the VAE, like a video's first clip."""
    net = models.net
    clip = _batch_tensor(batch, "frames", models)  # (B, F, 3, H, W)
    motion = _batch_tensor(batch, "motion", models)  # (B, M, 3, H, W)
    b, frames = clip.shape[:2]
    m = motion.shape[1]
    drops = dropouts or draw_stage2_dropouts(b, settings, generator, models.device)
    latents = models.encode_images(clip.flatten(0, 1), generator)
    latents = latents.unflatten(0, (b, frames)).transpose(1, 2)  # (B, 4, F, h, w)

    motion = motion * (~drops.start.to(models.device))[:, None, None, None, None].to(motion.dtype)
    reference = _batch_tensor(batch, "reference", models)
    ref_batch = torch.cat([reference[:, None], motion], dim=1).flatten(0, 1)  # per sample [ref, m1..mM]
    ref_latents = models.encode_images(ref_batch, generator)

    text = models.encode_text(batch["text"])
    with _grad_if_trainable(net.imageproj):
        context = torch.cat([text, net.imageproj(_batch_tensor(batch, "identity", models))], dim=1)
    with _grad_if_trainable(net.face_locator):
        face_features = net.face_locator(_batch_tensor(batch, "face_region", models))
    with _grad_if_trainable(net.reference_unet):
        bank = net.reference_unet(ref_latents, context.repeat_interleave(1 + m, 0), 0)
    attend = (~drops.image).tolist()
    reader = ReferenceReader(bank, ReferencePairing.for_samples(attend, frames, m))

    audio = net.audioproj(_batch_tensor(batch, "audio", models))  # (B, F, tokens, D)
    audio = audio * (~drops.audio.to(models.device))[:, None, None, None].to(audio.dtype)
    audio_inputs = AudioAttentionInputs(
        audio=audio,
        emotion=text.repeat_interleave(frames, 0),  # the description queries the audio in every frame
        masks=frame_masks(batch["masks"], frames, models.device, models.dtype),
        weights=settings.branch_weights,
    )
    targets = _noise_and_targets(models, latents, settings.noise_offset, settings.snr_gamma, generator)
    prediction = net.denoising_unet(targets.noisy, targets.timesteps, context, audio_inputs,
                                    face_features=face_features, reference=reader)
    loss, per_sample = weighted_loss(prediction, targets)
    return StepResult(loss, per_sample, targets.timesteps, targets.weights, drops)
