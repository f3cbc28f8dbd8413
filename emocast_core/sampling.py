"""The emotive sampler: DDIM with classifier-free guidance over 16-frame clips chained by motion frames.

It reproduces the released inference loop (docs/model.md §5.3–5.5, docs/release_quirks.md §3–6): the ReferenceNet runs once per clip
on `[reference, motion frame 1, motion frame 2]`; the unconditional half of the guidance batch gets empty
text, the projection of a zero identity, no face-locator features and zero audio tokens, but the same
emotion text in the audio attention and the same masks; the noise of every clip is drawn in the run dtype
from one CPU generator seeded once per video; the motion frames of clip k+1 are the last decoded frames of
clip k (in float, not 8-bit).
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from diffusers import AutoencoderKL, DDIMScheduler

from .emotion import EmotionSchedule
from .models.denoising_unet import AudioAttentionInputs
from .models.net import EmoCASTNet
from .models.reference_attention import ReferencePairing, ReferenceReader
from .sampling_settings import IMAGE_SIZE_MULTIPLE, SamplingSettings
from .scheduler import initial_noise

if TYPE_CHECKING:
    from .preprocess.audio_features import AudioFeatures


class GenerationCancelled(RuntimeError):
    """Raised between denoising steps when the caller's cancel check says so."""


@dataclass
class SamplerInputs:
    """Everything the sampler needs, already preprocessed.

    reference: (3, H, W) in [-1, 1]; face_region: (3, H, W) in [0, 1] (FaceLocator input); identity: (512,)
    raw ArcFace embedding; masks: (pose, face, lip), each a list over the 4 UNet levels of (L,) or (1, L)
    tensors in [0, 1]; audio: the per-frame wav2vec2 features, padded to whole clips of the sampler's clip
    length (the sampler builds each clip's windows of `net.config.audio_projection.window` frames as it
    reaches the clip, never the whole video's at once); num_frames: frames to keep (the audio's length at
    25 fps)."""

    reference: torch.Tensor
    face_region: torch.Tensor
    identity: torch.Tensor
    masks: Sequence[Sequence[torch.Tensor]]
    audio: AudioFeatures
    num_frames: int
    emotion: EmotionSchedule


@dataclass(frozen=True)
class Progress:
    clip: int  # 0-based
    clips: int
    step: int  # 1-based, within the clip
    steps: int

    @property
    def done(self) -> int:
        """Denoising steps finished over the whole video."""
        return self.clip * self.steps + self.step

    @property
    def total(self) -> int:
        """Denoising steps of the whole video."""
        return self.clips * self.steps


@dataclass
class _Prepared:
    """Per-video tensors that do not change between clips."""

    face_tokens: torch.Tensor  # (2, tokens, D): [uncond, cond]
    face_features: torch.Tensor  # (2, C, h, w): [zeros, FaceLocator]
    masks: list[list[torch.Tensor]] = field(default_factory=list)


def _prepare(net: EmoCASTNet, cond: SamplerInputs, device: torch.device, dtype: torch.dtype) -> _Prepared:
    identity = cond.identity.reshape(1, -1).to(device, dtype)
    face_tokens = net.imageproj(torch.cat([torch.zeros_like(identity), identity]))
    located = net.face_locator(cond.face_region[None].to(device, dtype))
    masks = [[m.reshape(1, -1).to(device, dtype) for m in levels] for levels in cond.masks]
    return _Prepared(face_tokens, torch.cat([torch.zeros_like(located), located]), masks)


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A torch dtype from a `SamplingSettings` precision field (a dtype or its name, e.g. "float16")."""
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def _encode_reference(vae: AutoencoderKL, frames: torch.Tensor) -> torch.Tensor:
    """(n, 3, H, W) in [-1, 1] -> latents: the posterior mean (no sampling), scaled."""
    return vae.encode(frames).latent_dist.mean * vae.config.scaling_factor


def _decode(vae: AutoencoderKL, latents: torch.Tensor, batch: int) -> torch.Tensor:
    """(1, 4, F, h, w) -> (F, 3, H, W) float32 in [0, 1], decoded a few frames at a time to bound memory."""
    frames = (latents * (1 / vae.config.scaling_factor))[0].transpose(0, 1)
    images = [vae.decode(chunk).sample for chunk in frames.split(batch)]
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1).float()


def sample_clip(net: EmoCASTNet, vae: AutoencoderKL, scheduler: DDIMScheduler, prepared: _Prepared,
                reference_batch: torch.Tensor, audio_windows: torch.Tensor, emotion: tuple[torch.Tensor, torch.Tensor],
                unconditional_text: torch.Tensor, noise: torch.Tensor, settings: SamplingSettings,
                step_callback: Callable[[int], None] | None = None) -> torch.Tensor:
    """One clip. reference_batch (1+M, 3, H, W) in [-1, 1]; audio_windows (F, window, layers, C);
    noise (1, 4, F, h, w). Returns the decoded frames (F, 3, H, W) in [0, 1]."""
    frames = noise.shape[2]
    text, per_frame_text = emotion
    context = torch.cat([torch.cat([unconditional_text, text]), prepared.face_tokens], dim=1)  # (2, 77+4, D)

    audio = net.audioproj(audio_windows[None])
    audio_inputs = AudioAttentionInputs(
        audio=torch.cat([torch.zeros_like(audio), audio]),
        emotion=torch.cat([per_frame_text, per_frame_text]),  # both halves get the prompt
        masks=prepared.masks,
        weights=settings.weights,
    )
    ref_latents = _encode_reference(vae, reference_batch)
    # Reference batch [ref, m.., ref, m..] with the two contexts tiled [u, c, u, c, ...] (the release's pairing).
    bank = net.reference_unet(torch.cat([ref_latents, ref_latents]), context.repeat(ref_latents.shape[0], 1, 1),
                              torch.zeros((), device=noise.device))
    reader = ReferenceReader(bank.rounded(_as_dtype(settings.bank_dtype)),
                             ReferencePairing.official_cfg(frames, settings.motion_frames))
    latents = noise
    for i, t in enumerate(scheduler.timesteps):
        v = net.denoising_unet(torch.cat([latents, latents]), t, context, audio_inputs,
                               face_features=prepared.face_features, reference=reader)
        v_uncond, v_cond = v.chunk(2)
        v = v_uncond + settings.cfg * (v_cond - v_uncond)
        latents = scheduler.step(v, t, latents).prev_sample
        if step_callback is not None:
            step_callback(i + 1)
    return _decode(vae, latents, settings.decode_batch)


def generate_frames(net: EmoCASTNet, vae: AutoencoderKL, scheduler: DDIMScheduler, cond: SamplerInputs,
                    settings: SamplingSettings, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32,
                    progress: Callable[[Progress], None] | None = None,
                    cancel: Callable[[], bool] | None = None) -> torch.Tensor:
    """Generate the whole video: (num_frames, 3, H, W) float32 in [0, 1].

    `progress` is called after every denoising step; `cancel` is checked before every step and raises
    `GenerationCancelled` when it returns True."""
    return torch.cat(list(iter_clips(net, vae, scheduler, cond, settings, device, dtype, progress, cancel)))


def check_clip_length(audio: AudioFeatures, settings: SamplingSettings) -> None:
    """The audio features must be padded to whole clips of the length the sampler runs."""
    if audio.clip_length != settings.clip_length:
        raise ValueError(f"the audio features were padded to clips of {audio.clip_length} frames but sampling "
                         f"uses clip_length {settings.clip_length}; encode the audio with clip_length "
                         f"{settings.clip_length}")


@torch.no_grad()
def iter_clips(net: EmoCASTNet, vae: AutoencoderKL, scheduler: DDIMScheduler, cond: SamplerInputs,
               settings: SamplingSettings, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32,
               progress: Callable[[Progress], None] | None = None,
               cancel: Callable[[], bool] | None = None) -> Iterator[torch.Tensor]:
    """The video clip by clip, each (frames, 3, H, W) float32 on the CPU, the last one trimmed to the audio:
    a long video can be written as it is made instead of being held in memory."""
    settings.validate()
    device = torch.device(device)
    n_pad = cond.audio.num_padded_frames
    clip_len, motion = settings.clip_length, settings.motion_frames
    check_clip_length(cond.audio, settings)
    audio_window = net.config.audio_projection.window
    if not 0 < cond.num_frames <= n_pad:
        raise ValueError(f"num_frames {cond.num_frames} must be in 1..{n_pad}")
    clips = n_pad // clip_len
    height, width = cond.reference.shape[-2:]
    if height % IMAGE_SIZE_MULTIPLE or width % IMAGE_SIZE_MULTIPLE:
        raise ValueError(f"image size {width}x{height} must be a multiple of {IMAGE_SIZE_MULTIPLE}")

    scheduler = copy.deepcopy(scheduler)
    scheduler.set_timesteps(settings.steps, device=device)
    prepared = _prepare(net, cond, device, dtype)
    generator = torch.Generator("cpu").manual_seed(settings.seed)
    reference = cond.reference.to(device, dtype)
    unconditional = cond.emotion.uncond.to(device, dtype)
    motion_frames = reference[None].expand(motion, -1, -1, -1)
    for clip in range(clips):
        noise = initial_noise(generator, (1, 4, clip_len, height // 8, width // 8), dtype,
                              draw_dtype=_as_dtype(settings.noise_dtype))
        start = clip * clip_len
        text, per_frame = cond.emotion.for_clip(start, clip_len)

        def on_step(step: int, clip: int = clip) -> None:
            if progress is not None:
                progress(Progress(clip, clips, step, settings.steps))
            if cancel is not None and step < settings.steps and cancel():
                raise GenerationCancelled("generation cancelled")

        if cancel is not None and cancel():
            raise GenerationCancelled("generation cancelled")
        decoded = sample_clip(
            net, vae, scheduler, prepared,
            torch.cat([reference[None], motion_frames]),
            cond.audio.clip_windows(clip, audio_window).to(device, dtype),
            (text.to(device, dtype), per_frame.to(device, dtype)), unconditional,
            noise.to(device, dtype), settings, on_step)
        motion_frames = (decoded[-motion:] * 2 - 1).to(device, dtype)
        yield decoded[: cond.num_frames - start].cpu()
