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
from .conditioning import (FPS, AudioInput, EmotionInput, FaceInput, GenerationResult, encode_audio, encode_emotion,
                           encode_face, log_start, sample, trim_audio, video_conditioning)
from .emotion import EmotionTextEncoder
from .model_paths import ModelPaths
from .models.net import EmoCASTNet
from .preprocess.audio import AudioClip, VocalSeparator
from .preprocess.audio_features import Wav2Vec2AudioEncoder
from .preprocess.face import FaceAnalyzer
from .preprocess.vocal_separation import find_separator
from .single_file import load_clip_text_file, load_vae_file, load_wav2vec2_file
from .sampling import GenerationCancelled, Progress, SamplingSettings, iter_clips
from .scheduler import make_scheduler

log = logging.getLogger("emocast_core.pipeline")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

__all__ = ["EmoCASTModels", "GenerationRequest", "GenerationResult", "GenerationCancelled", "Progress",
           "encode_request", "generate", "generate_video", "resolve_dtype", "resolve_device", "trim_audio"]


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


def onnx_providers(device: torch.device) -> tuple[str, ...]:
    """ONNX Runtime providers for the face and separator models: CUDA first when the run is on a GPU and
    the installed onnxruntime has it (the CPU-only package does not), the CPU always."""
    import onnxruntime

    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if device.type == "cuda" else ("CPUExecutionProvider",)
    available = set(onnxruntime.get_available_providers())
    return tuple(p for p in wanted if p in available) or ("CPUExecutionProvider",)


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
        if paths.vae_file is not None:
            vae = load_vae_file(paths.vae_file, dtype=dtype).to(device)
        else:
            vae = AutoencoderKL.from_pretrained(paths.vae, local_files_only=True, torch_dtype=dtype).to(device)
        vae.requires_grad_(False)
        if paths.clip_file is not None:
            text = load_clip_text_file(paths.clip_file, paths.tokenizer_dir, device=device, dtype=dtype)
        else:
            text = EmotionTextEncoder.from_pretrained(paths.clip, device=device, dtype=dtype)
        if paths.wav2vec2_file is not None:
            audio = load_wav2vec2_file(paths.wav2vec2_file, device=device)
        else:
            audio = Wav2Vec2AudioEncoder.from_pretrained(paths.wav2vec2, device=device)  # fp32, as released
        providers = onnx_providers(device)
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


def encode_request(models: EmoCASTModels, request: GenerationRequest) -> tuple[FaceInput, AudioInput, EmotionInput]:
    """Preprocess the three inputs (errors name the input at fault)."""
    face = encode_face(models, request.image, request.size, request.crop)
    audio = encode_audio(models, request.audio, request.sampling.clip_length, request.separate_vocals)
    emotion = encode_emotion(models, request.emotion, request.crossfade, request.strength)
    return face, audio, emotion


def generate(models: EmoCASTModels, request: GenerationRequest,
             progress: Callable[[Progress], None] | None = None,
             cancel: Callable[[], bool] | None = None) -> GenerationResult:
    return sample(models, *encode_request(models, request), request.sampling, progress, cancel)


def generate_video(models: EmoCASTModels, request: GenerationRequest, out_path: str | Path,
                   progress: Callable[[Progress], None] | None = None,
                   cancel: Callable[[], bool] | None = None) -> Path:
    """Generate and write the MP4 (H.264 + AAC) clip by clip, so memory does not grow with the video's
    length; nothing is left at out_path unless it completes."""
    from .video import VideoWriter

    face, audio, emotion = encode_request(models, request)
    cond = video_conditioning(models, face, audio, emotion)
    log_start(models, cond, request.sampling, face.size)
    with VideoWriter(out_path, fps=FPS, audio=trim_audio(request.audio, cond.num_frames)) as writer:
        for clip in iter_clips(models.net, models.vae, models.scheduler, cond, request.sampling,
                               device=models.device, dtype=models.dtype, progress=progress, cancel=cancel):
            writer.write(clip)
    return writer.path
