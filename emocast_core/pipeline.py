"""The complete generation path: portrait + speech + emotion text -> frames (+ the speech, trimmed to them).

`EmoCASTModels.load` reads the model folder once; `generate` runs preprocessing and the emotive sampler;
`generate_video` also writes the MP4. The ComfyUI nodes and the CLI are thin layers over these.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .generation_steps import (EncodedAudio, EncodedEmotion, EncodedFace, GenerationResult, check_settings,
                               encode_audio, encode_emotion, encode_face, sample, sample_clips, trim_audio)
from .preprocess.audio import AudioClip
from .rates import FPS
from .runtime import EmoCASTModels
from .sampling import GenerationCancelled, Progress
from .sampling_settings import SamplingSettings

__all__ = ["EmoCASTModels", "GenerationRequest", "GenerationResult", "GenerationCancelled", "Progress",
           "encode_request", "generate", "generate_video"]


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


def encode_request(models: EmoCASTModels,
                   request: GenerationRequest) -> tuple[EncodedFace, EncodedAudio, EncodedEmotion]:
    """Check the settings, then preprocess the three inputs (errors name the input at fault)."""
    check_settings(request.sampling, request.size, request.emotion, request.crossfade, request.strength)
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
    clips = sample_clips(models, face, audio, emotion, request.sampling, progress, cancel)
    with VideoWriter(out_path, fps=FPS, audio=trim_audio(request.audio, audio.num_frames)) as writer:
        for clip in clips:
            writer.write(clip)
    return writer.path
