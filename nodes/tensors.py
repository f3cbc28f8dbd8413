"""Conversions between ComfyUI's data types and the library's (imported by the nodes when they run).

IMAGE: float32 [B, H, W, 3] in 0..1 (a video is one batch); MASK: float32 [B, H, W] in 0..1;
AUDIO: {"waveform": float32 [B, C, S] in -1..1, "sample_rate": int}. The library uses (N, 3, H, W)
frames, (H, W, 3) uint8 portraits and `AudioClip` ((C, S) waveform).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..emocast_core.preprocess.audio import AudioClip


def _check_image(image: Any, name: str) -> torch.Tensor:
    if not isinstance(image, torch.Tensor) or image.dim() != 4 or image.shape[-1] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{name} must be a ComfyUI IMAGE [batch, height, width, 3], got {shape}")
    if image.shape[0] == 0:
        raise ValueError(f"{name} is an empty image batch")
    return image


def image_to_portrait(image: Any, name: str = "image") -> np.ndarray:
    """The single image of an IMAGE batch as (H, W, 3) RGB uint8."""
    image = _check_image(image, name)
    if image.shape[0] != 1:
        raise ValueError(f"{name} is a batch of {image.shape[0]} images but EmoCAST animates one portrait; pick "
                         "one with an 'ImageFromBatch' node (batch_index, length 1)")
    pixels = image[0].detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.cpu().numpy())


def image_to_frames(image: Any, name: str = "image") -> torch.Tensor:
    """IMAGE [B, H, W, 3] -> (B, 3, H, W) float32."""
    return _check_image(image, name).float().permute(0, 3, 1, 2)


def frames_to_image(frames: torch.Tensor, device: Any = "cpu") -> torch.Tensor:
    """(N, 3, H, W) float in 0..1 -> IMAGE [N, H, W, 3] float32, contiguous, on `device`."""
    return frames.permute(0, 2, 3, 1).to(device=device, dtype=torch.float32).contiguous()


def audio_to_clip(audio: Any, name: str = "audio") -> AudioClip:
    """The single recording of an AUDIO dict as an `AudioClip` (native rate and channels)."""
    if not isinstance(audio, Mapping) or "waveform" not in audio or "sample_rate" not in audio:
        raise ValueError(f"{name} must be a ComfyUI AUDIO dict with 'waveform' [batch, channels, samples] and "
                         f"'sample_rate', got {type(audio).__name__}")
    wave = audio["waveform"]
    if not isinstance(wave, torch.Tensor) or wave.dim() != 3:
        shape = tuple(wave.shape) if isinstance(wave, torch.Tensor) else type(wave).__name__
        raise ValueError(f"{name} waveform must be [batch, channels, samples], got {shape}")
    if wave.shape[0] != 1:
        raise ValueError(f"{name} holds a batch of {wave.shape[0]} recordings but EmoCAST animates one; split the "
                         "batch first")
    return AudioClip(wave[0].detach().cpu().float(), int(audio["sample_rate"]))


def clip_to_audio(clip: AudioClip) -> dict[str, Any]:
    """`AudioClip` -> AUDIO dict with a batch of one."""
    return {"waveform": clip.waveform[None].contiguous(), "sample_rate": int(clip.sample_rate)}


def rect_mask(rect: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """MASK [1, size, size]: 1 inside the (x0, y0, x1, y1) end-exclusive rectangle."""
    from ..emocast_core.preprocess.face_masks import rect_mask as rect_image

    return torch.from_numpy(rect_image(rect, size, size)).float()[None] / 255


def level_mask(level: torch.Tensor, size: int) -> torch.Tensor:
    """A flattened square attention mask (L,) upsampled (bilinear) to MASK [1, size, size]."""
    side = int(round(level.numel() ** 0.5))
    square = level.reshape(1, 1, side, side).float()
    return torch.nn.functional.interpolate(square, size=(size, size), mode="bilinear", align_corners=False)[0]
