"""MDX-Net vocal separation: STFT layout, segmentation / overlap-add, errors, model discovery."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from emocast_core.preprocess.audio import AudioClip, VocalSeparator
from emocast_core.preprocess.vocal_separation import MDXParams, MDXVocalSeparator, find_separator, uvr_model_hash
from emocast_core.testing.separator_model import write_channel_swap_mdx, write_identity_mdx, write_lowpass_mdx
from emocast_core.testing.speech import synthesize_speech

# Small segments keep the tests fast; the band limit stays at the official 768/2048 of 44.1 kHz = 16.5 kHz.
PARAMS = MDXParams(n_fft=2048, hop=512, dim_f=768, dim_t=32)
RATE = 16000


def _tone(freq: float, seconds: float, rate: int = RATE, amplitude: float = 0.5) -> torch.Tensor:
    t = torch.arange(int(seconds * rate), dtype=torch.float64) / rate
    return (amplitude * torch.sin(2 * math.pi * freq * t)).to(torch.float32)


def _amplitude(signal: torch.Tensor, freq: float, rate: int) -> float:
    """Amplitude of the `freq` component (least squares against sin and cos)."""
    t = torch.arange(signal.shape[-1], dtype=torch.float64) / rate
    basis = torch.stack([torch.sin(2 * math.pi * freq * t), torch.cos(2 * math.pi * freq * t)], dim=1)
    coef = torch.linalg.lstsq(basis, signal.to(torch.float64)[:, None]).solution
    return coef.norm().item()


@pytest.fixture(scope="module")
def identity(tmp_path_factory: pytest.TempPathFactory) -> MDXVocalSeparator:
    path = write_identity_mdx(tmp_path_factory.mktemp("mdx") / "identity.onnx", PARAMS)
    return MDXVocalSeparator.from_file(path, params=PARAMS)


def test_identity_model_returns_speech(identity: MDXVocalSeparator) -> None:
    speech = torch.from_numpy(synthesize_speech("Hello there, how are you today?"))
    assert isinstance(identity, VocalSeparator)  # pluggable into extract_audio_features
    vocals = identity(speech)
    assert vocals.shape == speech.shape and vocals.dtype == torch.float32
    assert np.corrcoef(speech.numpy(), vocals.numpy())[0, 1] > 0.999
    # the stem carries the model's output gain (peak 0.63 stays under the 0.9 limit)
    gain = (vocals @ speech / (speech @ speech)).item()
    assert gain == pytest.approx(PARAMS.compensate, abs=2e-3)


def test_segments_overlap_add_without_seams(identity: MDXVocalSeparator) -> None:
    tone = _tone(400.0, 3.0)  # 40-sample period: every 160-sample block holds whole periods
    assert tone.shape[0] * PARAMS.sample_rate / RATE > 10 * PARAMS.step  # many segment boundaries
    out = identity(tone)
    edge = RATE // 20  # resampling filters settle within 50 ms of the ends
    inner, expected = out[edge:-edge], PARAMS.compensate * tone[edge:-edge]
    block_rms = inner[: inner.shape[0] // 160 * 160].reshape(-1, 160).square().mean(dim=1).sqrt()
    target = 0.5 / math.sqrt(2) * PARAMS.compensate
    assert torch.allclose(block_rms, torch.full_like(block_rms, target), rtol=2e-3)
    assert (inner - expected).abs().max().item() < 2e-3


def test_lowpass_model_removes_high_tone_keeps_low(tmp_path: Path) -> None:
    cutoff_hz = 3000.0
    cutoff_bin = round(cutoff_hz * PARAMS.n_fft / PARAMS.sample_rate)
    separator = MDXVocalSeparator.from_file(write_lowpass_mdx(tmp_path / "lp.onnx", PARAMS, cutoff_bin), params=PARAMS)
    mix = _tone(500.0, 1.5, amplitude=0.3) + _tone(5000.0, 1.5, amplitude=0.3)
    vocals = separator(mix)
    assert _amplitude(vocals, 500.0, RATE) == pytest.approx(0.3 * PARAMS.compensate, rel=1e-2)
    assert _amplitude(vocals, 5000.0, RATE) < 1e-3
    # without the mask both tones pass: the removal comes from the frequency axis, not the chain
    identity = MDXVocalSeparator.from_file(write_identity_mdx(tmp_path / "id.onnx", PARAMS), params=PARAMS)
    assert _amplitude(identity(mix), 5000.0, RATE) == pytest.approx(0.3 * PARAMS.compensate, rel=1e-2)


def test_lowest_bins_are_cleared_like_the_official(identity: MDXVocalSeparator) -> None:
    mix = _tone(500.0, 1.5, amplitude=0.3) + 0.2  # a DC offset lives in bins 0-1 of the Hann-windowed STFT
    vocals = identity(mix)
    edge = RATE // 20
    assert abs(vocals[edge:-edge].mean().item()) < 2e-3
    assert _amplitude(vocals, 500.0, RATE) == pytest.approx(0.3 * PARAMS.compensate, rel=1e-2)


def test_channel_swap_model_proves_real_imag_channel_layout(tmp_path: Path) -> None:
    separator = MDXVocalSeparator.from_file(write_channel_swap_mdx(tmp_path / "swap.onnx", PARAMS), params=PARAMS)
    rate = 22050  # also exercises resampling of a non-16 kHz clip to the model's 44.1 kHz
    left, right = _tone(500.0, 1.0, rate, 0.4), _tone(1200.0, 1.0, rate, 0.2)
    stem = separator.separate(AudioClip(torch.stack([left, right]), rate))
    assert stem.sample_rate == PARAMS.sample_rate and stem.num_channels == 2
    assert stem.num_samples == 2 * left.shape[0]
    out_left, out_right = stem.waveform
    assert _amplitude(out_left, 1200.0, stem.sample_rate) == pytest.approx(0.2 * PARAMS.compensate, rel=1e-2)
    assert _amplitude(out_left, 500.0, stem.sample_rate) < 1e-3
    assert _amplitude(out_right, 500.0, stem.sample_rate) == pytest.approx(0.4 * PARAMS.compensate, rel=1e-2)
    assert _amplitude(out_right, 1200.0, stem.sample_rate) < 1e-3


def test_separate_keeps_mono_layout_and_limits_peak(identity: MDXVocalSeparator) -> None:
    loud = _tone(700.0, 0.5, PARAMS.sample_rate, amplitude=1.0)
    stem = identity.separate(AudioClip(loud[None], PARAMS.sample_rate))
    assert stem.num_channels == 1 and stem.num_samples == loud.shape[0]
    # the mix is limited to 0.9 before the model and the compensated stem again after it
    assert stem.waveform.abs().max().item() == pytest.approx(PARAMS.peak_limit, rel=1e-4)
    assert np.corrcoef(stem.waveform[0].numpy(), loud.numpy())[0, 1] > 0.9999


def test_near_silent_stem_is_an_error(tmp_path: Path) -> None:
    path = write_identity_mdx(tmp_path / "mute.onnx", PARAMS, gain=0.0)
    separator = MDXVocalSeparator.from_file(path, params=PARAMS)
    with pytest.raises(ValueError, match=r"near-silent vocal stem.*mute\.onnx|mute\.onnx.*near-silent vocal stem"):
        separator(_tone(300.0, 0.5))


def test_wrong_signature_names_the_file(tmp_path: Path) -> None:
    other_dims = write_identity_mdx(tmp_path / "other.onnx", MDXParams(n_fft=2048, hop=512, dim_f=512, dim_t=32))
    with pytest.raises(ValueError, match=r"other\.onnx.*\(batch, 4, 768, 32\)"):
        MDXVocalSeparator.from_file(other_dims, params=PARAMS)
    mono_layout = write_identity_mdx(tmp_path / "two_channels.onnx", PARAMS, channels=2)
    with pytest.raises(ValueError, match=r"two_channels\.onnx.*\(batch_size, 2, 768, 32\)"):
        MDXVocalSeparator.from_file(mono_layout, params=PARAMS)
    not_onnx = tmp_path / "broken.onnx"
    not_onnx.write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"could not load .*broken\.onnx"):
        MDXVocalSeparator.from_file(not_onnx, params=PARAMS)
    with pytest.raises(FileNotFoundError, match=r"missing\.onnx.*Kim_Vocal_2"):
        MDXVocalSeparator.from_file(tmp_path / "missing.onnx")


def test_bad_input_and_params_are_rejected(identity: MDXVocalSeparator) -> None:
    with pytest.raises(ValueError, match=r"mono waveform \(samples,\), got \(2, 100\)"):
        identity(torch.zeros(2, 100))
    with pytest.raises(ValueError, match="NaN or infinite"):
        identity(torch.full((1000,), float("nan")))
    with pytest.raises(ValueError, match="segment_overlap"):
        MDXParams(segment_overlap=1.0)
    with pytest.raises(ValueError, match="longer than n_fft"):
        MDXParams(n_fft=2048, hop=64, dim_f=768, dim_t=32)
    with pytest.raises(ValueError, match="dim_f"):
        MDXParams(n_fft=2048, dim_f=1100)


def test_find_separator(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert find_separator(tmp_path) is None
    folder = tmp_path / "separator"
    folder.mkdir()
    assert find_separator(tmp_path) is None

    # any single .onnx is used; an unknown model gets Kim_Vocal_2's settings with a warning
    single = write_identity_mdx(folder / "my_vocals.onnx")  # the official (batch, 4, 3072, 256) signature
    with caplog.at_level(logging.WARNING, logger="emocast_core.audio"):
        found = find_separator(tmp_path)
    assert found is not None and found.source == str(single) and found.params == MDXParams()
    assert "not a known MDX-Net vocal model" in caplog.text

    write_identity_mdx(folder / "another.onnx", gain=0.5)
    with pytest.raises(ValueError, match=r"several ONNX models \(another\.onnx, my_vocals\.onnx\)"):
        find_separator(tmp_path)

    preferred = write_identity_mdx(folder / "Kim_Vocal_2.onnx")
    found = find_separator(tmp_path)
    assert found is not None and found.source == str(preferred)


def test_uvr_hash_of_a_small_file_is_its_md5(tmp_path: Path) -> None:
    path = tmp_path / "tiny.onnx"
    path.write_bytes(b"abc")
    assert uvr_model_hash(path) == "900150983cd24fb0d6963f7d28e17f72"  # RFC 1321 test vector for "abc"
