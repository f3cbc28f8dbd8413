"""The complete generation path: portrait + speech + emotion text -> frames (+ the speech, trimmed to them).

`EmoCASTModels.load` reads the model folder once; `generate` runs preprocessing and the emotive sampler;
`generate_video` also writes the MP4. The ComfyUI nodes and the CLI are thin layers over these.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler

from .checkpoints import load_net
from .emotion import EmotionTextEncoder, build_emotion_conditioning
from .model_paths import ModelPaths
from .models.net import EmoCASTNet
from .preprocess.audio import AudioClip, VocalSeparator
from .preprocess.audio_features import Wav2Vec2AudioEncoder, extract_audio_features
from .preprocess.face import FaceAnalyzer, FaceConditioning, prepare_face
from .preprocess.vocal_separation import find_separator
from .sampling import (GenerationCancelled, Progress, SamplingSettings, VideoConditioning, generate_frames,
                       iter_clips)
from .scheduler import make_scheduler

log = logging.getLogger("emocast_core.pipeline")

FPS = 25
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["EmoCASTModels", "GenerationRequest", "GenerationResult", "GenerationCancelled", "Progress",
           "generate", "generate_video", "resolve_dtype", "resolve_device"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': fp16 on a GPU (what the release runs), fp32 on the CPU (where fp16 is slow or unsupported)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}") from None


@dataclass
class EmoCASTModels:
    """Every model the pipeline needs, loaded once and reused across generations."""

    net: EmoCASTNet
    vae: AutoencoderKL
    text_encoder: EmotionTextEncoder
    audio_encoder: Wav2Vec2AudioEncoder
    face_analyzer: FaceAnalyzer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    separator: VocalSeparator | None = None  # present when the model folder has separator/*.onnx

    @classmethod
    def load(cls, paths: ModelPaths, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "EmoCASTModels":
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        net = load_net(paths.net, paths.config, device=device, dtype=dtype)
        net.requires_grad_(False)
        vae = AutoencoderKL.from_pretrained(paths.vae, local_files_only=True, torch_dtype=dtype).to(device)
        vae.requires_grad_(False)
        text = EmotionTextEncoder.from_pretrained(paths.clip, device=device, dtype=dtype)
        audio = Wav2Vec2AudioEncoder.from_pretrained(paths.wav2vec2, device=device)  # fp32, as released
        providers = ("CUDAExecutionProvider", "CPUExecutionProvider") if device.type == "cuda" \
            else ("CPUExecutionProvider",)
        face = FaceAnalyzer.from_folder(paths.face_analysis, providers=providers)
        separator = find_separator(paths.root, providers=providers)
        return cls(net, vae, text, audio, face, make_scheduler(), device, dtype, separator)

    @property
    def image_size_multiple(self) -> int:
        return 64


@dataclass
class GenerationRequest:
    image: np.ndarray  # (H, W, 3) RGB uint8, any size
    audio: AudioClip
    emotion: str = "a person talking"  # a prompt, or a timeline "0: calm | 4.0: furious"
    size: int = 512
    crop: bool = True  # square crop around the face (False: resize the whole image, as released)
    crossfade: float = 0.5  # seconds, between timeline prompts
    strength: float = 1.0  # experimental: 1.0 is the released behaviour
    sampling: SamplingSettings = field(default_factory=SamplingSettings)
    separate_vocals: bool = True  # when the model folder has a separator (as released: always on)


@dataclass
class GenerationResult:
    frames: torch.Tensor  # (T, 3, H, W) float32 in [0, 1]
    audio: AudioClip  # the input speech cut to exactly T / fps seconds
    fps: int
    face: FaceConditioning

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]


def trim_audio(audio: AudioClip, num_frames: int, fps: int = FPS) -> AudioClip:
    """The speech cut (or zero-padded) to exactly num_frames / fps seconds."""
    samples = round(num_frames * audio.sample_rate / fps)
    wave = audio.waveform[:, :samples]
    if wave.shape[1] < samples:
        wave = torch.nn.functional.pad(wave, (0, samples - wave.shape[1]))
    return AudioClip(wave.contiguous(), audio.sample_rate)


def prepare(models: EmoCASTModels, request: GenerationRequest) -> tuple[VideoConditioning, FaceConditioning]:
    """Preprocess the three inputs into the sampler's conditioning (errors name the input at fault)."""
    if request.size % models.image_size_multiple or request.size < 64:
        raise ValueError(f"size must be a positive multiple of {models.image_size_multiple} (got {request.size})")
    settings = request.sampling
    face = prepare_face(request.image, models.face_analyzer, size=request.size, crop=request.crop)
    audio = extract_audio_features(request.audio, models.audio_encoder, settings.clip_length,
                                   separator=models.separator if request.separate_vocals else None, fps=FPS)
    emotion = build_emotion_conditioning(models.text_encoder, request.emotion, audio.num_frames, fps=FPS,
                                         crossfade=request.crossfade, strength=request.strength)
    cond = VideoConditioning(
        reference=face.reference, face_region=face.face_region, identity=face.identity,
        masks=[face.masks.full, face.masks.face, face.masks.lip],
        audio_windows=audio.windows(models.net.config.audio_projection.window),
        num_frames=audio.num_frames, emotion=emotion)
    return cond, face


def _log_start(models: EmoCASTModels, request: GenerationRequest, cond: VideoConditioning) -> None:
    log.info("generating %d frames (%d clips of %d) at %dx%d, %d steps, cfg %.2f, %s on %s",
             cond.num_frames, cond.audio_windows.shape[0] // request.sampling.clip_length,
             request.sampling.clip_length, request.size, request.size, request.sampling.steps,
             request.sampling.cfg, str(models.dtype).removeprefix("torch."), models.device)


def generate(models: EmoCASTModels, request: GenerationRequest,
             progress: Callable[[Progress], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> GenerationResult:
    cond, face = prepare(models, request)
    _log_start(models, request, cond)
    frames = generate_frames(models.net, models.vae, models.scheduler, cond, request.sampling,
                             device=models.device, dtype=models.dtype, progress=progress, cancel=cancel)
    return GenerationResult(frames, trim_audio(request.audio, frames.shape[0]), FPS, face)


def generate_video(models: EmoCASTModels, request: GenerationRequest, out_path: str | Path,
                   progress: Callable[[Progress], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> Path:
    """Generate and write the MP4 (H.264 + AAC) clip by clip, so memory does not grow with the video's
    length; nothing is left at out_path unless it completes."""
    from .video import VideoWriter

    cond, _ = prepare(models, request)
    _log_start(models, request, cond)
    audio = trim_audio(request.audio, cond.num_frames)
    with VideoWriter(out_path, fps=FPS, audio=audio) as writer:
        for clip in iter_clips(models.net, models.vae, models.scheduler, cond, request.sampling,
                               device=models.device, dtype=models.dtype, progress=progress, cancel=cancel):
            writer.write(clip)
    return writer.path
