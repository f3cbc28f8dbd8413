"""wav2vec2 speech features at the video frame rate, numerically matching the official EmoCAST features.

The official wrapper changes one thing in `Wav2Vec2Model.forward`: the ~50 Hz conv features are linearly
resampled (align_corners=True) to the padded video frame count *before* the feature projection, so the
transformer runs at 25 Hz. We reproduce that by calling the HF model's own submodules in that order
(`feature_extractor` -> interpolate -> `feature_projection` -> `encoder`), which exist under the same
names in transformers 4.4x and 5.x. The per-layer hidden states are captured with forward hooks because
transformers 5 no longer lets the encoder return them when it is called on its own.

Long recordings. The release runs wav2vec2 over the whole recording at once. Its cost grows in two places:
the conv feature extractor's first layers (512 channels at 3.2 kHz: about 0.8 GB per minute of audio in fp32,
the bulk of the peak memory) and the transformer, whose self-attention is quadratic in length (15,000 frames
for 10 minutes at the 25 Hz this wrapper runs it): quadratic in time always, and in memory where attention
is not a memory-efficient kernel (eager attention: 12 heads x 15,000^2 fp32 = 10.8 GB per layer).
Recordings longer than one transformer window (`chunk_seconds` plus `context_seconds` on each side, 40 s by
default, counted after padding to whole clips) are therefore processed in pieces; shorter ones take exactly
the release's path, bit for bit:

* the whole-utterance normalisation, the padding to whole clips, the interpolation of the conv features to the
  frame count (its align_corners grid spans the whole recording) and the feature projection stay global;
* the conv feature extractor runs over chunks of `CONV_CHUNK_FRAMES` output frames with their exact receptive
  field, and the GroupNorm of its first layer (a per-channel normalisation over the *whole* recording, in
  wav2vec2-base) uses statistics of the whole recording, computed first from the moments of the waveform
  (the conv before it is linear): the result equals the unchunked conv features up to float rounding, while
  the memory no longer grows with the length;
* the transformer runs over overlapping windows: each window contributes the hidden states of its core
  (at most `chunk_seconds`, the cores split the recording evenly) and sees `context_seconds` more audio on
  each side, which is dropped. This is the one approximation (tests/test_audio_chunks.py measures it).
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

# The transformer of a long recording runs over windows of at most CHUNK + 2 * CONTEXT seconds.
# 30 s cores: about the sequence lengths wav2vec2-base was trained on (pretraining crops of 15.6 s at 50 Hz =
# 781 frames, and a 30 s core at our 25 Hz is 750; LibriSpeech fine-tuning utterances up to ~35 s), long enough that
# seams are rare (one per 30 s) and most talking-head clips take the release's single pass, short enough that
# the attention of one window is small (12 heads x 1000^2 fp32 = 48 MB even without a memory-efficient kernel).
# 5 s of context on each side: twice the reach of the positional convolution (128 frames = +-2.56 s at 25 Hz),
# so every kept frame gets exactly the positional embedding of the unchunked run, plus attention context;
# the overhead is (30 + 2 * 5) / 30 = 1.33x the transformer's work.
CHUNK_SECONDS = 30.0
CONTEXT_SECONDS = 5.0
# Conv-extractor chunk in output frames (~50 Hz): 500 = 10 s of audio, ~65 MB for the first layer's output.
# Chunking the conv stack is exact up to rounding, so this only trades memory for per-call overhead.
CONV_CHUNK_FRAMES = 500


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
        return self.frame_windows(0, self.num_padded_frames, window)

    def clip_windows(self, clip: int, window: int = 5) -> torch.Tensor:
        """The windows of clip `clip` (0-based): (clip_length, window, layers, channels), equal to
        `windows(window)[clip * clip_length:(clip + 1) * clip_length]` without building the whole video's
        (about 0.28 GB per minute of video for wav2vec2-base in fp32)."""
        if not 0 <= clip < self.num_clips:
            raise IndexError(f"clip {clip} out of range: the features hold {self.num_clips} clips")
        start = clip * self.clip_length
        return self.frame_windows(start, start + self.clip_length, window)

    def frame_windows(self, start: int, stop: int, window: int = 5) -> torch.Tensor:
        """Rows start..stop-1 of `windows(window)`: (stop - start, window, layers, channels)."""
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be a positive odd number, got {window}")
        n = self.num_padded_frames
        if not 0 <= start <= stop <= n:
            raise IndexError(f"frames {start}..{stop} out of range 0..{n}")
        half = window // 2
        offsets = torch.arange(-half, half + 1, device=self.features.device)
        index = (torch.arange(start, stop, device=self.features.device)[:, None] + offsets).clamp_(0, n - 1)
        return self.features[index]


class Wav2Vec2AudioEncoder:
    """A local HF wav2vec2 checkpoint run the EmoCAST way (fp32, eval, frame-rate conv interpolation).

    `chunk_seconds` / `context_seconds`: the transformer windows of long recordings (see the module docstring);
    `chunk_seconds=None` runs every recording in one pass, as the release does (memory grows with the length).
    """

    def __init__(self, model: Wav2Vec2Model, processor: Wav2Vec2FeatureExtractor,
                 chunk_seconds: float | None = CHUNK_SECONDS, context_seconds: float = CONTEXT_SECONDS,
                 conv_chunk_frames: int = CONV_CHUNK_FRAMES) -> None:
        if processor.sampling_rate != SAMPLE_RATE:
            raise ValueError(
                f"the wav2vec2 preprocessor expects {processor.sampling_rate} Hz audio; EmoCAST needs a "
                f"{SAMPLE_RATE} Hz model such as facebook/wav2vec2-base-960h"
            )
        if chunk_seconds is not None and not chunk_seconds > 0:
            raise ValueError(f"chunk_seconds must be positive (or None for one pass), got {chunk_seconds}")
        if not context_seconds >= 0:
            raise ValueError(f"context_seconds must be >= 0, got {context_seconds}")
        if conv_chunk_frames < 1:
            raise ValueError(f"conv_chunk_frames must be >= 1, got {conv_chunk_frames}")
        self.model = model.eval().to(torch.float32)
        self.processor = processor
        self.chunk_seconds = chunk_seconds
        self.context_seconds = context_seconds
        self.conv_chunk_frames = conv_chunk_frames

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
            hidden = self._hidden_states(normalized[None].to(self.device), padded_frames, fps)
        return AudioFeatures(hidden, num_frames=num_frames, clip_length=clip_length, fps=fps)

    def transformer_windows(self, num_frames: int, fps: int = FPS) -> list[tuple[int, int, int, int]]:
        """How the transformer covers `num_frames` frames: (start, stop, core_start, core_stop) per window.

        A recording that fits one window (chunk + 2 * context) is one window, [0, num_frames). A longer one
        is split into the fewest cores of at most `chunk_seconds`, of (nearly) equal length; each window is
        its core widened by `context_seconds` on each side (clamped to the recording), and keeps its core."""
        if self.chunk_seconds is None:
            return [(0, num_frames, 0, num_frames)]
        chunk = max(1, round(self.chunk_seconds * fps))
        context = round(self.context_seconds * fps)
        if num_frames <= chunk + 2 * context:
            return [(0, num_frames, 0, num_frames)]
        pieces = -(-num_frames // chunk)
        bounds = [i * num_frames // pieces for i in range(pieces + 1)]
        return [(max(0, a - context), min(num_frames, b + context), a, b) for a, b in zip(bounds, bounds[1:])]

    def _hidden_states(self, input_values: torch.Tensor, num_frames: int, fps: int = FPS) -> torch.Tensor:
        """(1, samples) -> hidden states 1..L of every frame, (num_frames, L, C) on the CPU."""
        windows = self.transformer_windows(num_frames, fps)
        chunked = len(windows) > 1
        if chunked:
            logger.info("wav2vec2: %d frames in %d overlapping windows of at most %d frames", num_frames,
                        len(windows), max(stop - start for start, stop, _, _ in windows))
            conv = _chunked_conv_features(self.model.feature_extractor, input_values, self.conv_chunk_frames)
        else:
            conv = self.model.feature_extractor(input_values)  # (1, C_conv, T_conv), ~50 Hz
        # Global, as in the release: the align_corners grid spans the whole recording.
        conv = F.interpolate(conv, size=num_frames, mode="linear", align_corners=True)
        projected, _ = self.model.feature_projection(conv.transpose(1, 2))
        del conv

        layers = self.model.encoder.layers
        out = torch.empty(num_frames, len(layers), self.hidden_size, dtype=torch.float32)
        captured: list[torch.Tensor] = []

        def keep_output(_module: torch.nn.Module, _inputs: tuple, output: torch.Tensor | tuple) -> None:
            # transformers 4.x layers return a tuple, 5.x a tensor
            captured.append(output[0] if isinstance(output, tuple) else output)

        handles = [layer.register_forward_hook(keep_output) for layer in layers]
        try:
            for start, stop, core_start, core_stop in windows:
                captured.clear()
                last = self.model.encoder(projected[:, start:stop] if chunked else projected)[0]
                if len(captured) != len(layers):
                    raise RuntimeError(f"expected {len(layers)} encoder layer outputs, captured {len(captured)}")
                # The last hidden state is the encoder output (it includes the final LayerNorm of
                # stable-layer-norm checkpoints, as transformers 4.x reports it); for post-LN models it equals
                # the last layer output.
                captured[-1] = last
                keep = slice(core_start - start, core_stop - start)
                for i, hidden in enumerate(captured):
                    out[core_start:core_stop, i] = hidden[0, keep]
        finally:
            for handle in handles:
                handle.remove()
        return out


def _conv_geometry(conv_layers: torch.nn.ModuleList) -> tuple[int, int]:
    """(receptive field, stride) in samples of one output frame of the conv stack."""
    field, stride = 1, 1
    for layer in conv_layers:
        field += (layer.conv.kernel_size[0] - 1) * stride
        stride *= layer.conv.stride[0]
    return field, stride


def _conv_output_length(conv_layers: torch.nn.ModuleList, samples: int) -> int:
    for layer in conv_layers:
        samples = (samples - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1
    return samples


def _chunked_conv_features(extractor: torch.nn.Module, input_values: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    """`extractor(input_values)` (the wav2vec2 conv feature encoder, (1, samples) -> (1, C, T)) computed over
    chunks of `chunk_frames` output frames, each from exactly its receptive field of samples.

    The convolutions and activations are local; the one global operation is the GroupNorm of the first
    layer in `feat_extract_norm="group"` models (wav2vec2-base), which normalises each channel over the whole
    recording: its statistics over the whole recording come first (`_group_norm_affine`, from the moments of
    the input), then it is applied chunk by chunk. Equal to the unchunked features up to float rounding; the
    memory is that of one chunk plus the (small, ~50 Hz) output."""
    layers = extractor.conv_layers
    first, rest = layers[0], layers[1:]
    norm = getattr(first, "layer_norm", None)
    if any(isinstance(getattr(layer, "layer_norm", None), torch.nn.GroupNorm) for layer in rest):
        logger.warning("wav2vec2 conv extractor with a GroupNorm after its first layer: running it in one pass")
        return extractor(input_values)
    samples = input_values.shape[-1]
    total = _conv_output_length(layers, samples)
    field, stride = _conv_geometry(layers)
    if total < 1:
        return extractor(input_values)

    scale = shift = None
    if isinstance(norm, torch.nn.GroupNorm):
        conv = first.conv
        if (conv.in_channels, conv.groups, conv.padding[0], conv.dilation[0]) != (1, 1, 0, 1):
            logger.warning("unexpected first wav2vec2 conv layer %s: running the conv extractor in one pass", conv)
            return extractor(input_values)
        scale, shift = _group_norm_affine(conv, norm, input_values, chunk_frames * (stride // conv.stride[0]))

    channels = layers[-1].conv.out_channels
    out = torch.empty(1, channels, total, dtype=input_values.dtype, device=input_values.device)
    for a in range(0, total, chunk_frames):
        b = min(total, a + chunk_frames)
        h = input_values[:, a * stride:(b - 1) * stride + field][:, None]
        if scale is None:
            h = first(h)
        else:
            h = first.activation(first.conv(h).mul_(scale).add_(shift))
        for layer in rest:
            h = layer(h)
        if h.shape[-1] != b - a:
            raise RuntimeError(f"conv chunk {a}..{b} gave {h.shape[-1]} frames, expected {b - a}")
        out[..., a:b] = h
    return out


def _group_norm_affine(conv: torch.nn.Conv1d, norm: torch.nn.GroupNorm, input_values: torch.Tensor,
                       chunk_frames: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The GroupNorm of `conv`'s output over the whole recording as a per-channel affine map (scale, shift),
    each (1, C, 1), such that norm(conv(x)) == conv(x) * scale + shift.

    The conv is linear, so its output's moments follow from those of the input patches it sees (`kernel`
    samples every `stride`): mean_c = w_c . mu + b_c and var_c = w_c^T Sigma w_c, with mu and Sigma (kernel x
    kernel) accumulated over the recording in float64, `chunk_frames` patches at a time. No conv output is
    materialised, and the statistics are exact up to the last bits."""
    kernel, step = conv.kernel_size[0], conv.stride[0]
    wave = input_values.reshape(-1)
    total = (wave.shape[0] - kernel) // step + 1
    acc = torch.float32 if wave.device.type == "mps" else torch.float64  # MPS has no float64
    patch_sum = torch.zeros(kernel, dtype=acc, device=wave.device)
    gram = torch.zeros(kernel, kernel, dtype=acc, device=wave.device)
    for a in range(0, total, chunk_frames):
        b = min(total, a + chunk_frames)
        patches = wave[a * step:(b - 1) * step + kernel].unfold(0, kernel, step).to(acc)  # (b - a, kernel)
        patch_sum += patches.sum(dim=0)
        gram += patches.T @ patches
    mu = patch_sum / total
    sigma = gram / total - torch.outer(mu, mu)
    weight = conv.weight.reshape(conv.out_channels, kernel).to(acc)
    channel_mean = weight @ mu
    if conv.bias is not None:
        channel_mean = channel_mean + conv.bias.to(acc)
    channel_var = ((weight @ sigma) * weight).sum(dim=1)
    # Group moments (law of total variance over the group's channels); a group per channel in wav2vec2.
    groups = norm.num_groups
    group_mean = channel_mean.view(groups, -1).mean(dim=1, keepdim=True)
    group_var = (channel_var.view(groups, -1) + (channel_mean.view(groups, -1) - group_mean).square()).mean(dim=1)
    per_group = norm.num_channels // groups
    rstd = torch.rsqrt(group_var + norm.eps).repeat_interleave(per_group)  # biased variance, as GroupNorm
    mean = group_mean.reshape(-1).repeat_interleave(per_group)
    gamma = norm.weight.to(acc) if norm.affine else torch.ones_like(rstd)
    beta = norm.bias.to(acc) if norm.affine else torch.zeros_like(rstd)
    scale = rstd * gamma
    shift = beta - mean * scale
    dtype = input_values.dtype
    return scale.to(dtype).view(1, -1, 1), shift.to(dtype).view(1, -1, 1)


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
