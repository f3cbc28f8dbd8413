"""wav2vec2 speech features at the video frame rate, numerically matching the official EmoCAST features.

The official wrapper changes one thing in `Wav2Vec2Model.forward`: the ~50 Hz conv features are linearly
resampled (align_corners=True) to the padded video frame count *before* the feature projection, so the
transformer runs at 25 Hz. We reproduce that by calling the HF model's own submodules in that order
(`feature_extractor` -> interpolate -> `feature_projection` -> `encoder`), which exist under the same
names in transformers 4.4x and 5.x. The per-layer hidden states are captured with forward hooks because
transformers 5 no longer lets the encoder return them when it is called on its own.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import Wav2Vec2FeatureExtractor, Wav2Vec2Model

from ..rates import FPS, SAMPLE_RATE
from .audio import (
    AudioClip,
    VocalSeparator,
    frame_count,
    load_audio,
    to_mono_16k,
    validate_clip,
)

logger = logging.getLogger("emocast_core.audio")


@dataclass
class AudioFeatures:
    """Per-frame wav2vec2 hidden states.

    `features` is (N_pad, layers, channels): hidden states 1..L of every video frame, N_pad a multiple of
    `clip_length`. Only the first `num_frames` frames correspond to real audio; the rest come from the
    zero padding and are generated but trimmed from the final video.
    """

    features: torch.Tensor
    num_frames: int
    clip_length: int
    fps: int = FPS

    def __post_init__(self) -> None:
        if self.features.dim() != 3:
            raise ValueError(
                f"AudioFeatures.features must be (frames, layers, channels), got {tuple(self.features.shape)}"
            )
        padded = self.features.shape[0]
        if self.clip_length < 1 or padded % self.clip_length != 0:
            raise ValueError(f"padded frame count {padded} is not a multiple of clip_length {self.clip_length}")
        if not 1 <= self.num_frames <= padded:
            raise ValueError(f"num_frames must be in [1, {padded}], got {self.num_frames}")

    @property
    def num_padded_frames(self) -> int:
        return self.features.shape[0]

    @property
    def num_clips(self) -> int:
        return self.num_padded_frames // self.clip_length

    def windows(self, window: int = 5) -> torch.Tensor:
        """Stack each frame with its neighbours: (N_pad, window, layers, channels).

        Row i holds frames i-w//2 .. i+w//2 (earliest first), indices clamped into [0, N_pad-1], i.e. the
        first and last frames are repeated at the edges (the official `process_audio_emb`).
        """
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number, got {window}")
        n = self.num_padded_frames
        half = window // 2
        offsets = torch.arange(-half, half + 1, device=self.features.device)
        index = (torch.arange(n, device=self.features.device)[:, None] + offsets).clamp_(0, n - 1)
        return self.features[index]


class Wav2Vec2AudioEncoder:
    """A local HF wav2vec2 checkpoint run the EmoCAST way (fp32, eval, frame-rate conv interpolation)."""

    def __init__(self, model: Wav2Vec2Model, processor: Wav2Vec2FeatureExtractor) -> None:
        if processor.sampling_rate != SAMPLE_RATE:
            raise ValueError(
                f"the wav2vec2 preprocessor expects {processor.sampling_rate} Hz audio; EmoCAST needs a "
                f"{SAMPLE_RATE} Hz model such as facebook/wav2vec2-base-960h"
            )
        self.model = model.eval().to(torch.float32)
        self.processor = processor

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu") -> "Wav2Vec2AudioEncoder":
        """Load `Wav2Vec2Model` and its `preprocessor_config.json` from a local folder (never the hub)."""
        folder = Path(folder)
        for name in ("config.json", "preprocessor_config.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} not found; point to a local wav2vec2 folder (e.g. a download of "
                    "facebook/wav2vec2-base-960h with config.json, preprocessor_config.json and the weights)."
                )
        model = Wav2Vec2Model.from_pretrained(str(folder), local_files_only=True)
        processor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        return cls(model.to(device), processor)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def normalize(self, waveform: torch.Tensor) -> torch.Tensor:
        """Whole-utterance normalisation exactly as the checkpoint's feature extractor does it (numpy fp32)."""
        values = self.processor(
            waveform.detach().cpu().numpy(), sampling_rate=SAMPLE_RATE, return_tensors="np"
        ).input_values
        return torch.from_numpy(values.reshape(-1)).to(torch.float32)

    def encode(self, waveform: torch.Tensor, clip_length: int, fps: int = FPS) -> AudioFeatures:
        """Mono 16 kHz waveform (samples,) -> `AudioFeatures` padded to a whole number of clips."""
        if waveform.dim() != 1:
            raise ValueError(
                f"encode expects a mono waveform (samples,), got shape {tuple(waveform.shape)}; use to_mono_16k"
            )
        if clip_length < 1:
            raise ValueError(f"clip_length must be >= 1, got {clip_length}")
        validate_clip(AudioClip(waveform[None], SAMPLE_RATE), source="the waveform given to encode", fps=fps)

        # Normalise before padding: the padding stays exactly zero, as in the official features.
        normalized = self.normalize(waveform)
        num_frames = frame_count(normalized.shape[0], SAMPLE_RATE, fps)
        padded_frames = -(-num_frames // clip_length) * clip_length
        samples_per_frame = SAMPLE_RATE // fps
        normalized = F.pad(normalized, (0, (padded_frames - num_frames) * samples_per_frame))

        with torch.inference_mode():
            hidden = self._hidden_states(normalized[None].to(self.device), padded_frames)
        return AudioFeatures(hidden[0].cpu(), num_frames=num_frames, clip_length=clip_length, fps=fps)

    def _hidden_states(self, input_values: torch.Tensor, num_frames: int) -> torch.Tensor:
        """(1, samples) -> hidden states 1..L stacked as (1, num_frames, L, C)."""
        conv = self.model.feature_extractor(input_values)  # (1, C_conv, T_conv), ~50 Hz
        conv = F.interpolate(conv, size=num_frames, mode="linear", align_corners=True)
        projected, _ = self.model.feature_projection(conv.transpose(1, 2))

        layers = self.model.encoder.layers
        captured: list[torch.Tensor] = []

        def keep_output(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
            # transformers 4.x layers return a tuple, 5.x a tensor
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep_output) for layer in layers]
        try:
            last = self.model.encoder(projected)[0]
        finally:
            for handle in handles:
                handle.remove()
        if len(captured) != len(layers):
            raise RuntimeError(f"expected {len(layers)} encoder layer outputs, captured {len(captured)}")
        # The last hidden state is the encoder output (it includes the final LayerNorm of stable-layer-norm
        # checkpoints, as transformers 4.x reports it); for post-LN models it equals the last layer output.
        captured[-1] = last
        return torch.stack(captured, dim=2)


def extract_audio_features(
    source: str | os.PathLike | AudioClip,
    encoder: Wav2Vec2AudioEncoder,
    clip_length: int,
    separator: VocalSeparator | None = None,
    fps: int = FPS,
) -> AudioFeatures:
    """Speech file (or decoded clip) -> optional vocal separation -> wav2vec2 features per video frame."""
    if isinstance(source, AudioClip):
        validate_clip(source, source="the audio clip", fps=fps)
        clip = source
    else:
        clip = load_audio(source)
    if separator is None:
        logger.info(
            "vocal separation is off: wav2vec2 sees the audio as given (music or noise will leak into the features)"
        )
        waveform = to_mono_16k(clip)
    elif hasattr(separator, "separate"):
        # A clip-level separator sees the file at its own rate and channels, as the release separates the
        # original file at 44.1 kHz before resampling to 16 kHz.
        waveform = _checked_stem(to_mono_16k(separator.separate(clip)), fps)
    else:
        waveform = _checked_stem(separator(to_mono_16k(clip)), fps)
    return encoder.encode(waveform, clip_length, fps=fps)


def _checked_stem(vocals: torch.Tensor, fps: int) -> torch.Tensor:
    if not isinstance(vocals, torch.Tensor) or vocals.dim() != 1:
        shape = tuple(vocals.shape) if isinstance(vocals, torch.Tensor) else type(vocals)
        raise ValueError(f"the vocal separator must return a mono waveform (samples,), got {shape}")
    try:
        validate_clip(AudioClip(vocals[None], SAMPLE_RATE), source="the separated vocal stem", fps=fps)
    except ValueError as err:
        raise ValueError(f"{err} The recording may contain no speech; try without vocal separation.") from err
    return vocals
