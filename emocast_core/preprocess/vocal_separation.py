"""MDX-Net vocal separation (the official pipeline runs `Kim_Vocal_2.onnx` before wav2vec2).

An MDX-Net ONNX model maps a spectrogram segment to the spectrogram of the vocal stem; the STFT, the
segmentation and the overlap-add live outside the graph. This module does that part with torch and runs
the graph with onnxruntime, using the settings audio-separator 0.17.2 applies to Kim_Vocal_2:

* the mix at 44.1 kHz stereo (mono duplicated), peak-limited to 0.9;
* zero-padded by `n_fft // 2` in front and to a whole number of segments behind, then cut into segments
  of `hop * (dim_t - 1)` samples every `(1 - overlap)` segment lengths (the last ones shorter and
  zero-filled);
* per segment a centred STFT (periodic Hann window) whose `dim_t` frames and first `dim_f` bins form a
  (1, 4, dim_f, dim_t) tensor with channels [left real, left imag, right real, right imag]; the lowest
  three bins are zeroed; the model output is padded back to `n_fft // 2 + 1` bins with zeros and
  inverted;
* segments are weighted with a symmetric Hann window of their length and normalised by the summed
  weights; the padding is cut off, the stem multiplied by the model's `compensate` gain and peak-limited
  to 0.9 again.

The official separator silently writes no file when the stem is near-silent; here that is an error.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort
import torch
import torchaudio.functional as AF

from ..rates import SAMPLE_RATE
from .audio import AudioClip

logger = logging.getLogger("emocast_core.audio")

SEPARATOR_SUBDIR = "separator"
DEFAULT_MODEL_FILE = "Kim_Vocal_2.onnx"
# audio-separator skips writing a stem whose peak is below this; we raise instead.
NEAR_SILENT_PEAK = 1e-6
# UVR identifies a model by the MD5 of its last 10,000 KiB (the whole file when smaller).
_UVR_HASH_TAIL_BYTES = 10000 * 1024


@dataclass(frozen=True)
class MDXParams:
    """STFT and segmentation settings of an MDX-Net model; the defaults are Kim_Vocal_2's official ones.

    `dim_t` is also the segment length in STFT frames (audio-separator's `segment_size` 256 equals
    Kim_Vocal_2's `dim_t`, so the ONNX graph runs unchanged). `compensate` is the model's output gain from
    UVR's model data; `peak_limit` is audio-separator's `normalization_threshold`; `zeroed_low_bins` are
    the lowest STFT bins cleared before the model sees the spectrogram.
    """

    n_fft: int = 7680
    hop: int = 1024
    dim_f: int = 3072
    dim_t: int = 256
    compensate: float = 1.009
    segment_overlap: float = 0.25
    sample_rate: int = 44100
    peak_limit: float = 0.9
    zeroed_low_bins: int = 3

    def __post_init__(self) -> None:
        if self.n_fft < 2 or self.n_fft % 2 or self.hop < 1 or self.sample_rate < 1:
            raise ValueError(
                f"MDXParams needs an even n_fft >= 2 and positive hop/sample_rate, got n_fft={self.n_fft}, "
                f"hop={self.hop}, sample_rate={self.sample_rate}"
            )
        if not 1 <= self.dim_f <= self.n_fft // 2 + 1:
            raise ValueError(
                f"MDXParams.dim_f must be in [1, n_fft // 2 + 1 = {self.n_fft // 2 + 1}], got {self.dim_f}"
            )
        if self.dim_t < 2:
            raise ValueError(f"MDXParams.dim_t must be >= 2 frames, got {self.dim_t}")
        if not 0.0 <= self.segment_overlap < 1.0:
            raise ValueError(f"MDXParams.segment_overlap must be in [0, 1), got {self.segment_overlap}")
        if self.compensate <= 0 or self.peak_limit <= 0:
            raise ValueError(
                f"MDXParams.compensate and peak_limit must be positive, got {self.compensate}, {self.peak_limit}"
            )
        if not 0 <= self.zeroed_low_bins <= self.dim_f:
            raise ValueError(f"MDXParams.zeroed_low_bins must be in [0, dim_f], got {self.zeroed_low_bins}")
        if self.gen_size < 1:
            raise ValueError(
                f"MDXParams segment of hop * (dim_t - 1) = {self.chunk_size} samples must be longer than "
                f"n_fft = {self.n_fft}; raise dim_t or hop"
            )

    @property
    def trim(self) -> int:
        """Zero padding in front of the mix (and the part of each segment edge the STFT sees only partly)."""
        return self.n_fft // 2

    @property
    def chunk_size(self) -> int:
        """Samples per segment: exactly `dim_t` centred STFT frames."""
        return self.hop * (self.dim_t - 1)

    @property
    def gen_size(self) -> int:
        """The padded mix length is a multiple of this (a segment less both trims)."""
        return self.chunk_size - 2 * self.trim

    @property
    def step(self) -> int:
        """Distance between segment starts."""
        return int((1 - self.segment_overlap) * self.chunk_size)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """The model input without the batch axis: (4, dim_f, dim_t)."""
        return (4, self.dim_f, self.dim_t)


# Vocal MDX-Net models whose settings are known (UVR model data, keyed by the UVR hash of the file).
_KNOWN_MODELS: dict[str, tuple[str, MDXParams]] = {
    "970b3f9492014d18fefeedfe4773cb42": ("Kim_Vocal_2", MDXParams()),
    "77d07b2667ddf05b9e3175941b4454a0": ("UVR-MDX-NET-Voc_FT", MDXParams(compensate=1.021)),
}


def uvr_model_hash(path: str | os.PathLike) -> str:
    """The key under which UVR's model data lists a model: MD5 of the file's last 10,000 KiB."""
    with open(path, "rb") as handle:
        handle.seek(max(0, os.path.getsize(path) - _UVR_HASH_TAIL_BYTES))
        return hashlib.md5(handle.read()).hexdigest()


class MDXVocalSeparator:
    """An MDX-Net ONNX vocal model with its STFT settings; callable as a `VocalSeparator`."""

    def __init__(self, session: ort.InferenceSession, params: MDXParams, source: str = "the MDX-Net model") -> None:
        self.params = params
        self.source = source
        self._input_name = _check_signature(session, params, source)
        self._session = session

    @classmethod
    def from_file(
        cls,
        onnx_path: str | os.PathLike,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        params: MDXParams | None = None,
    ) -> "MDXVocalSeparator":
        """Load an MDX-Net ONNX file; without `params` the settings of a known model (or Kim_Vocal_2's) apply."""
        path = Path(onnx_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"vocal separator model not found: {path}; download {DEFAULT_MODEL_FILE} (UVR MDX-Net) "
                "or turn vocal separation off"
            )
        if params is None:
            params = _params_for(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's graph-optimisation chatter is not for the user
        try:
            session = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))
        except Exception as err:  # onnxruntime raises its own Exception subclasses
            raise ValueError(f"could not load {path} as an ONNX model: {err}; re-download {path.name}") from err
        return cls(session, params, source=str(path))

    def __call__(self, waveform: torch.Tensor) -> torch.Tensor:
        """Mono 16 kHz waveform (samples,) -> vocal stem (samples,) at 16 kHz, same length."""
        if not isinstance(waveform, torch.Tensor) or waveform.dim() != 1:
            shape = tuple(waveform.shape) if isinstance(waveform, torch.Tensor) else type(waveform)
            raise ValueError(f"the vocal separator expects a mono waveform (samples,), got {shape}")
        vocals = self.separate(AudioClip(waveform[None], SAMPLE_RATE)).waveform[0]
        vocals = AF.resample(vocals, self.params.sample_rate, SAMPLE_RATE)
        return vocals[: waveform.shape[0]].contiguous()

    def separate(self, clip: AudioClip) -> AudioClip:
        """Vocal stem of a clip at the model's rate (44.1 kHz) and the clip's layout (mono or stereo).

        Stereo is separated per channel pair as the official code does; mono is duplicated to stereo and
        the two output channels averaged; more than two channels are downmixed to mono first.
        """
        if clip.num_samples == 0:
            raise ValueError("the clip given to the vocal separator is empty; provide a speech recording")
        if not torch.isfinite(clip.waveform).all():
            raise ValueError("the clip given to the vocal separator contains NaN or infinite samples")
        mix = clip.waveform if clip.num_channels <= 2 else clip.waveform.mean(dim=0, keepdim=True)
        if clip.sample_rate != self.params.sample_rate:
            mix = AF.resample(mix, clip.sample_rate, self.params.sample_rate)
        mono = mix.shape[0] == 1
        vocals = self._separate_stereo(mix.expand(2, -1) if mono else mix)
        if mono:
            vocals = vocals.mean(dim=0, keepdim=True)
        return AudioClip(vocals, self.params.sample_rate)

    def _separate_stereo(self, mix: torch.Tensor) -> torch.Tensor:
        """(2, n) at the model rate -> vocal stem (2, n), peak-limited like the written official stem."""
        p = self.params
        vocals = self._demix(_limit_peak(mix.to(torch.float32), p.peak_limit)) * p.compensate
        vocals = _limit_peak(vocals, p.peak_limit)
        peak = vocals.abs().max().item()
        if peak < NEAR_SILENT_PEAK:
            raise ValueError(
                f"the vocal separator {self.source} produced a near-silent vocal stem (peak {peak:.1e}, below "
                f"{NEAR_SILENT_PEAK:.0e}): the audio seems to contain no voice. Check the recording or turn "
                "vocal separation off."
            )
        return vocals

    def _demix(self, mix: torch.Tensor) -> torch.Tensor:
        """Segment, separate and overlap-add: (2, n) -> (2, n) before compensation."""
        p = self.params
        length = mix.shape[-1]
        back_pad = p.gen_size + p.trim - length % p.gen_size
        mixture = torch.nn.functional.pad(mix, (p.trim, back_pad))
        total = mixture.shape[-1]
        summed = torch.zeros_like(mixture)
        weight = torch.zeros(total, dtype=mixture.dtype)
        for start in range(0, total, p.step):
            part = mixture[:, start : start + p.chunk_size]
            size = part.shape[-1]
            # the last segments run past the end: the model sees zeros there, only `size` samples are kept
            stem = self._run_segment(torch.nn.functional.pad(part, (0, p.chunk_size - size)))[:, :size]
            window = (
                torch.hann_window(size, periodic=False, dtype=mixture.dtype)
                if p.segment_overlap > 0
                else torch.ones(size, dtype=mixture.dtype)
            )
            summed[:, start : start + size] += stem * window
            weight[start : start + size] += window
        # a window is zero only at a segment's first/last sample, which a neighbouring segment covers
        result = torch.where(weight > 0, summed / weight.clamp_min(1e-12), torch.zeros_like(summed))
        return result[:, p.trim : p.trim + length]

    def _run_segment(self, segment: torch.Tensor) -> torch.Tensor:
        """One (2, chunk_size) segment through STFT -> model -> inverse STFT."""
        p = self.params
        window = torch.hann_window(p.n_fft, dtype=segment.dtype)
        spec = torch.stft(segment, p.n_fft, hop_length=p.hop, window=window, center=True, return_complex=True)
        # (channel, freq, time) complex -> (1, channel * [re, im], dim_f, dim_t)
        layout = torch.view_as_real(spec[:, : p.dim_f]).permute(0, 3, 1, 2).reshape(1, *p.input_shape)
        layout[:, :, : p.zeroed_low_bins] = 0
        predicted = self._session.run(None, {self._input_name: layout.contiguous().numpy()})[0]
        predicted = torch.from_numpy(np.asarray(predicted, dtype=np.float32))
        if tuple(predicted.shape) != (1, *p.input_shape):
            raise ValueError(
                f"the vocal separator {self.source} returned shape {tuple(predicted.shape)}, expected "
                f"{(1, *p.input_shape)}; it is not an MDX-Net model for these settings"
            )
        full = torch.zeros(2, p.n_fft // 2 + 1, p.dim_t, 2, dtype=segment.dtype)
        full[:, : p.dim_f] = predicted.reshape(2, 2, p.dim_f, p.dim_t).permute(0, 2, 3, 1)
        return torch.istft(
            torch.view_as_complex(full), p.n_fft, hop_length=p.hop, window=window, center=True, length=p.chunk_size
        )


def find_separator(
    models_dir: str | os.PathLike,
    providers: Sequence[str] = ("CPUExecutionProvider",),
    params: MDXParams | None = None,
) -> MDXVocalSeparator | None:
    """The vocal separator under `<models_dir>/separator/` (Kim_Vocal_2.onnx, or the only .onnx there).

    Returns None when there is none, so the caller runs without separation (and says so).
    """
    folder = Path(models_dir) / SEPARATOR_SUBDIR
    preferred = folder / DEFAULT_MODEL_FILE
    if preferred.is_file():
        return MDXVocalSeparator.from_file(preferred, providers=providers, params=params)
    candidates = sorted(folder.glob("*.onnx")) if folder.is_dir() else []
    if not candidates:
        logger.info("no vocal separator in %s (expected %s)", folder, DEFAULT_MODEL_FILE)
        return None
    if len(candidates) > 1:
        names = ", ".join(path.name for path in candidates)
        raise ValueError(
            f"{folder} holds several ONNX models ({names}) and no {DEFAULT_MODEL_FILE}; keep only the vocal "
            f"separator there or name it {DEFAULT_MODEL_FILE}"
        )
    return MDXVocalSeparator.from_file(candidates[0], providers=providers, params=params)


def _params_for(path: Path) -> MDXParams:
    known = _KNOWN_MODELS.get(uvr_model_hash(path))
    if known is not None:
        logger.info("vocal separator %s is %s", path, known[0])
        return known[1]
    logger.warning(
        "vocal separator %s is not a known MDX-Net vocal model; assuming Kim_Vocal_2's settings and that it "
        "outputs the vocal stem (pass MDXParams to override)",
        path,
    )
    return MDXParams()


def _check_signature(session: ort.InferenceSession, params: MDXParams, source: str) -> str:
    """Name of the model's single input after checking it (and the output) fit (batch, 4, dim_f, dim_t)."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    expected = ("batch", *params.input_shape)
    problem = None
    if len(inputs) != 1 or len(outputs) < 1:
        problem = f"{len(inputs)} inputs and {len(outputs)} outputs"
    elif inputs[0].type != "tensor(float)" or not _fits(inputs[0].shape, params.input_shape):
        problem = f"input {inputs[0].name!r} {inputs[0].type} {_describe(inputs[0].shape)}"
    elif not _fits(outputs[0].shape, params.input_shape):
        problem = f"output {outputs[0].name!r} {_describe(outputs[0].shape)}"
    if problem is not None:
        raise ValueError(
            f"{source} does not fit an MDX-Net vocal separator with dim_f={params.dim_f}, dim_t={params.dim_t}: "
            f"it has {problem}, expected one float input and output (batch, 4, dim_f, dim_t) = "
            f"{_describe(expected)}. Use {DEFAULT_MODEL_FILE}, or pass MDXParams matching the model."
        )
    return inputs[0].name


def _fits(shape: Sequence[Any] | None, expected: tuple[int, ...]) -> bool:
    # symbolic (named or unknown) dimensions are accepted, the run checks them; segments go one at a time
    if shape is None:
        return True
    if len(shape) != 1 + len(expected):
        return False
    return all(not isinstance(dim, int) or dim == want for dim, want in zip(shape, (1, *expected)))


def _describe(shape: Sequence[Any] | None) -> str:
    return "(" + ", ".join(str(dim) for dim in shape) + ")" if shape is not None else "(unknown shape)"


def _limit_peak(waveform: torch.Tensor, limit: float) -> torch.Tensor:
    peak = waveform.abs().max()
    return waveform * (limit / peak) if peak > limit else waveform
