"""Speech loading and framing: any common audio file -> validated clip -> mono 16 kHz waveform.

Decoding goes through PyAV (FFmpeg), so WAV, MP3, FLAC, M4A/AAC and OGG (Vorbis/Opus) all work at any
sample rate and channel count. Integer PCM is converted to float the way FFmpeg and libsndfile do
(int16 / 32768), which keeps 16-bit WAV input bit-identical to the official librosa loading.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import av
import numpy as np
import torch
import torchaudio.functional as AF

from ..rates import FPS, SAMPLE_RATE

# -80 dBFS: far below any real recording (even a quiet one sits around -40 dBFS), above dither noise.
SILENCE_RMS = 1e-4

SUPPORTED_FORMATS = "WAV, MP3, FLAC, M4A/AAC or OGG (Vorbis/Opus)"


@dataclass
class AudioClip:
    """Decoded audio: `waveform` (channels, samples) float32 in [-1, 1] at `sample_rate` Hz."""

    waveform: torch.Tensor
    sample_rate: int

    def __post_init__(self) -> None:
        if not isinstance(self.waveform, torch.Tensor) or self.waveform.dim() != 2:
            shape = tuple(self.waveform.shape) if isinstance(self.waveform, torch.Tensor) else type(self.waveform)
            raise ValueError(f"AudioClip.waveform must be a (channels, samples) tensor, got {shape}")
        if not self.waveform.is_floating_point():
            raise ValueError(
                f"AudioClip.waveform must be float in [-1, 1], got {self.waveform.dtype}; "
                "scale integer PCM first (e.g. int16 / 32768)"
            )
        if int(self.sample_rate) <= 0:
            raise ValueError(f"AudioClip.sample_rate must be positive, got {self.sample_rate}")
        self.waveform = self.waveform.to(torch.float32)
        self.sample_rate = int(self.sample_rate)

    @property
    def num_channels(self) -> int:
        return self.waveform.shape[0]

    @property
    def num_samples(self) -> int:
        return self.waveform.shape[1]

    @property
    def duration(self) -> float:
        """Length in seconds."""
        return self.num_samples / self.sample_rate


@runtime_checkable
class VocalSeparator(Protocol):
    """Isolates the voice: mono 16 kHz waveform (samples,) -> vocal stem (samples,) at 16 kHz.

    The official pipeline removes music and noise with an MDX-Net model before wav2vec2; any callable
    with this signature can be plugged into the feature pipeline.
    """

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor: ...


def frame_count(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = FPS) -> int:
    """Number of video frames covering `num_samples`, exactly as the official code counts them.

    The division comes first in float64 (`ceil(n / sr * fps)`), so some exact multiples of a frame round
    up one frame (4480 samples = 7 frames of 640 gives 8); keeping that quirk keeps frame counts and
    therefore the conv-feature interpolation identical to the official features.
    """
    if num_samples < 0 or sample_rate <= 0 or fps <= 0:
        raise ValueError(
            f"frame_count needs num_samples >= 0 and positive sample_rate/fps, got {num_samples}, {sample_rate}, {fps}"
        )
    return math.ceil(num_samples / sample_rate * fps)


def validate_clip(clip: AudioClip, source: str = "audio", fps: int = FPS) -> None:
    """Reject audio that cannot drive a video: empty, shorter than one frame, non-finite or silent."""
    if clip.num_samples == 0:
        raise ValueError(f"{source} contains no audio samples (it is empty); provide a speech recording.")
    if clip.num_samples * fps < clip.sample_rate:
        raise ValueError(
            f"{source} is only {clip.duration * 1000:.1f} ms long, shorter than one video frame "
            f"({1000 / fps:.0f} ms at {fps} fps); provide a longer speech recording."
        )
    if not torch.isfinite(clip.waveform).all():
        raise ValueError(f"{source} contains NaN or infinite samples; re-export the recording.")
    rms = clip.waveform.square().mean().sqrt().item()
    if rms < SILENCE_RMS:
        raise ValueError(
            f"{source} is silent (RMS {rms:.1e}, below {SILENCE_RMS:.0e}); check the recording "
            "(muted microphone, wrong track or an empty export) and provide audio with audible speech."
        )


def load_audio(path: str | os.PathLike) -> AudioClip:
    """Decode the first audio stream of a file into a validated float32 `AudioClip` (native rate/channels)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the audio {path} is a folder; give the path of a speech file ({SUPPORTED_FORMATS}).")
    if not path.is_file():
        raise FileNotFoundError(f"Audio file not found: {path}; check the path (expected {SUPPORTED_FORMATS}).")
    try:
        container = av.open(str(path), mode="r")
    except av.FFmpegError as err:
        raise _undecodable(path, err) from err
    with container:
        if not container.streams.audio:
            raise ValueError(
                f"{path} has no audio stream; provide a speech file ({SUPPORTED_FORMATS}) "
                "or a video with a sound track."
            )
        try:
            waveform, sample_rate = _decode_stream(container, container.streams.audio[0])
        except av.FFmpegError as err:
            raise _undecodable(path, err) from err
    clip = AudioClip(torch.from_numpy(waveform), sample_rate)
    validate_clip(clip, source=str(path))
    return clip


def _undecodable(path: Path, err: Exception) -> ValueError:
    return ValueError(
        f"Could not decode audio file {path}: {err}. The file is corrupt or not a supported format; "
        f"re-export it as {SUPPORTED_FORMATS}."
    )


def _decode_stream(
    container: av.container.InputContainer, stream: av.audio.stream.AudioStream
) -> tuple[np.ndarray, int]:
    # Converting to planar float keeps rate and layout; swresample maps int16 to x / 32768 exactly.
    resampler = av.AudioResampler(format="fltp")
    chunks: list[np.ndarray] = []
    sample_rate = stream.rate
    for frame in container.decode(stream):
        sample_rate = frame.sample_rate
        chunks.extend(out.to_ndarray() for out in resampler.resample(frame))
    chunks.extend(out.to_ndarray() for out in resampler.resample(None))
    if not chunks:
        return np.zeros((max(stream.channels, 1), 0), dtype=np.float32), int(sample_rate or SAMPLE_RATE)
    return np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.float32), int(sample_rate)


def to_mono_16k(clip: AudioClip) -> torch.Tensor:
    """Average the channels, then resample to 16 kHz: returns (samples,) float32."""
    mono = clip.waveform.mean(dim=0)
    if clip.sample_rate == SAMPLE_RATE:
        return mono
    return AF.resample(mono, clip.sample_rate, SAMPLE_RATE)
