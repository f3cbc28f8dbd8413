"""Audio path: decoding, validation, framing, window stacking and parity with the official wav2vec2 features."""
from __future__ import annotations

import logging
import sys
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torchaudio.functional as AF

from conftest import FIXTURES
from emocast_core.preprocess.audio import AudioClip, frame_count, load_audio, to_mono_16k
from emocast_core.preprocess.audio_features import AudioFeatures, Wav2Vec2AudioEncoder, extract_audio_features
from emocast_core.testing.speech import synthesize_speech

SPEECH_TEXT = "Hello, this is a short test of the audio path. The portrait should move its lips with these words."


@pytest.fixture(scope="module")
def parity_dir() -> Path:
    return FIXTURES / "parity_audio"


@pytest.fixture(scope="module")
def encoder(parity_dir: Path) -> Wav2Vec2AudioEncoder:
    return Wav2Vec2AudioEncoder.from_pretrained(parity_dir / "wav2vec2-tiny")


@pytest.fixture(scope="module")
def speech() -> np.ndarray:
    return synthesize_speech(SPEECH_TEXT)


def _write_audio(path: Path, channels: np.ndarray, rate: int, codec: str, bit_rate: int | None = None,
                 options: dict[str, str] | None = None) -> Path:
    """Encode (channels, samples) float audio with PyAV, the way any audio editor would export it."""
    layout = "mono" if channels.shape[0] == 1 else "stereo"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=rate, layout=layout, options=options or {})
        if bit_rate:
            stream.bit_rate = bit_rate
        ctx = stream.codec_context
        resampler = av.AudioResampler(format=ctx.format, layout=layout, rate=rate, frame_size=ctx.frame_size or None)
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(channels, dtype=np.float32), format="fltp", layout=layout)
        frame.sample_rate = rate
        # A timestamp lets the muxer record the encoder delay, so decoders trim AAC/MP3 priming samples.
        frame.pts, frame.time_base = 0, Fraction(1, rate)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def _write_pcm16_wav(path: Path, samples: np.ndarray, rate: int = 16000) -> Path:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(rate)
        f.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return path


def _resample(x: np.ndarray, rate: int) -> np.ndarray:
    return AF.resample(torch.from_numpy(x), 16000, rate).numpy()


# --- parity with the official features ---------------------------------------------------------------


def test_features_match_official_fixture(parity_dir: Path, encoder: Wav2Vec2AudioEncoder) -> None:
    expected_files = sorted(parity_dir.glob("expected_*_clip*.pt"))
    assert len(expected_files) >= 4
    for path in expected_files:
        expected = torch.load(path, weights_only=True)
        features = extract_audio_features(parity_dir / expected["wav"], encoder, expected["clip_length"])
        emb = expected["audio_emb"]
        assert features.features.shape == emb.shape, path.name
        assert features.features.dtype == torch.float32
        assert features.num_frames == expected["audio_length"], path.name
        assert features.clip_length == expected["clip_length"]
        assert features.num_padded_frames % expected["clip_length"] == 0
        diff = (features.features - emb).abs().max().item()
        assert diff <= 1e-4, f"{path.name}: max |diff| {diff}"


def test_ten_seconds_pad_to_whole_clips(encoder: Wav2Vec2AudioEncoder, speech: np.ndarray) -> None:
    # 10 s -> 250 frames -> padded to 256: the spec's worked example.
    waveform = torch.from_numpy(np.resize(speech, 160000))
    features = encoder.encode(waveform, clip_length=16)
    assert (features.num_frames, features.num_padded_frames, features.num_clips) == (250, 256, 16)
    assert features.features.shape == (256, encoder.model.config.num_hidden_layers, encoder.hidden_size)
    normalized = encoder.normalize(waveform)
    assert abs(normalized.mean().item()) < 1e-4 and abs(normalized.std().item() - 1) < 1e-3
    # Whole-utterance normalisation removes the input gain.
    scaled = encoder.encode(waveform * 0.25, clip_length=16)
    assert (scaled.features - features.features).abs().max().item() < 1e-4


def test_conv_features_are_interpolated_before_projection(encoder: Wav2Vec2AudioEncoder, speech: np.ndarray) -> None:
    # The fixture lengths give 2N-1 conv frames, where align_corners interpolation just picks every other
    # frame; 12801 samples -> 21 frames, padded to 24 -> 45 conv frames, where it must really interpolate.
    waveform = torch.from_numpy(speech[:12801].copy())
    seen: list[torch.Tensor] = []
    handle = encoder.model.feature_projection.register_forward_hook(lambda _m, inputs, _o: seen.append(inputs[0]))
    try:
        features = encoder.encode(waveform, clip_length=4)
    finally:
        handle.remove()
    assert (features.num_frames, features.num_padded_frames) == (21, 24)
    padded = torch.nn.functional.pad(encoder.normalize(waveform), (0, 3 * 640))
    with torch.inference_mode():
        conv = encoder.model.feature_extractor(padded[None])
    assert conv.shape[-1] == 45
    expected = torch.nn.functional.interpolate(conv, size=24, mode="linear", align_corners=True).transpose(1, 2)
    not_corners = torch.nn.functional.interpolate(conv, size=24, mode="linear", align_corners=False).transpose(1, 2)
    assert len(seen) == 1 and seen[0].shape == (1, 24, conv.shape[1])
    assert torch.allclose(seen[0], expected, atol=1e-6)
    assert not torch.allclose(seen[0], not_corners, atol=1e-3)


@pytest.mark.parametrize(("samples", "frames"), [(4480, 8), (160000, 250), (640, 1), (45440, 71), (93968, 147), (641, 2)])
def test_frame_count_keeps_official_float_quirk(samples: int, frames: int) -> None:
    assert frame_count(samples) == frames


# --- window stacking ---------------------------------------------------------------------------------


def test_windows_clamp_at_edges() -> None:
    n, layers, channels = 8, 2, 3
    base = torch.arange(n, dtype=torch.float32)[:, None, None] * 100 + torch.arange(layers * channels).view(1, layers, channels)
    feats = AudioFeatures(base, num_frames=7, clip_length=4)
    win = feats.windows()
    assert win.shape == (n, 5, layers, channels)
    frame_of = win[:, :, 0, 0] / 100  # which source frame sits in each window slot
    assert frame_of[0].tolist() == [0, 0, 0, 1, 2]
    assert frame_of[1].tolist() == [0, 0, 1, 2, 3]
    assert frame_of[4].tolist() == [2, 3, 4, 5, 6]
    assert frame_of[n - 1].tolist() == [5, 6, 7, 7, 7]
    for i in range(n):
        for k, offset in enumerate(range(-2, 3)):
            assert torch.equal(win[i, k], base[min(max(i + offset, 0), n - 1)])
    assert feats.windows(3)[0, :, 0, 0].div(100).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match="odd"):
        feats.windows(4)


def test_audio_features_rejects_inconsistent_sizes() -> None:
    with pytest.raises(ValueError, match="multiple of clip_length"):
        AudioFeatures(torch.zeros(10, 2, 3), num_frames=10, clip_length=4)
    with pytest.raises(ValueError, match="num_frames"):
        AudioFeatures(torch.zeros(8, 2, 3), num_frames=9, clip_length=4)


# --- synthetic speech and decoding -------------------------------------------------------------------


def test_synthesized_speech_is_real_speech(speech: np.ndarray) -> None:
    assert speech.dtype == np.float32 and speech.ndim == 1
    assert 2.0 < len(speech) / 16000 < 10.0
    assert np.sqrt(np.mean(speech**2)) > 0.02
    assert np.abs(speech).max() <= 1.0
    # Speech has pauses: a good share of 20 ms windows is much quieter than the loudest ones.
    energy = np.sqrt((speech[: len(speech) // 320 * 320].reshape(-1, 320) ** 2).mean(axis=1))
    assert (energy < 0.1 * energy.max()).mean() > 0.1
    at_44k = synthesize_speech("Hello there.", sample_rate=44100)
    assert at_44k.dtype == np.float32 and 0.3 < len(at_44k) / 44100 < 3.0


def test_missing_espeak_package_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "espeakng_loader", None)
    with pytest.raises(ImportError, match="pip install espeakng-loader"):
        synthesize_speech("hello")


FORMATS = [
    # name, channel gains, rate, codec, bit rate, options
    ("speech_44k_stereo.wav", (1.0, 0.5), 44100, "pcm_s16le", None, None),
    ("speech.flac", (1.0,), 22050, "flac", None, None),
    ("speech.mp3", (1.0, 1.0), 44100, "libmp3lame", 128000, None),
    ("speech.m4a", (1.0,), 44100, "aac", 128000, None),
    ("speech_opus.ogg", (1.0,), 48000, "libopus", 64000, None),
    ("speech_vorbis.ogg", (1.0, 1.0), 44100, "vorbis", None, {"strict": "experimental"}),
]


@pytest.mark.parametrize(("name", "gains", "rate", "codec", "bit_rate", "options"), FORMATS, ids=[f[0] for f in FORMATS])
def test_decodes_common_formats(tmp_path: Path, speech: np.ndarray, name: str, gains: tuple[float, ...], rate: int,
                                codec: str, bit_rate: int | None, options: dict[str, str] | None) -> None:
    source = _resample(speech, rate)
    path = _write_audio(tmp_path / name, np.stack([g * source for g in gains]), rate, codec, bit_rate, options)
    clip = load_audio(path)
    assert clip.sample_rate == rate
    assert clip.num_channels == len(gains)
    assert clip.waveform.dtype == torch.float32 and clip.waveform.abs().max() <= 1.0
    mono = to_mono_16k(clip).numpy()
    assert mono.ndim == 1
    # Lossy codecs pad the last codec frame (20-46 ms); nothing else may change the length.
    assert abs(len(mono) - len(speech)) <= 800, f"{len(mono)} vs {len(speech)} samples"
    n = min(len(mono), len(speech))
    assert np.corrcoef(mono[:n], speech[:n])[0, 1] > 0.97
    # Channel averaging: the gain of the mono mix is the mean of the channel gains.
    gain = np.dot(mono[:n], speech[:n]) / np.dot(speech[:n], speech[:n])
    assert gain == pytest.approx(np.mean(gains), abs=0.06)


def test_wav_pcm16_is_read_exactly(tmp_path: Path, speech: np.ndarray) -> None:
    path = _write_pcm16_wav(tmp_path / "pcm.wav", speech)
    clip = load_audio(path)
    expected = (np.clip(speech, -1, 1) * 32767).astype(np.int16).astype(np.float32) / 32768
    assert clip.sample_rate == 16000 and clip.num_channels == 1
    assert np.array_equal(clip.waveform[0].numpy(), expected)
    assert clip.duration == pytest.approx(len(speech) / 16000)
    assert torch.equal(to_mono_16k(clip), clip.waveform[0])


def test_pipeline_accepts_a_decoded_stereo_clip(encoder: Wav2Vec2AudioEncoder, speech: np.ndarray) -> None:
    stereo = torch.from_numpy(np.stack([_resample(speech, 44100)] * 2))
    features = extract_audio_features(AudioClip(stereo, 44100), encoder, clip_length=16)
    direct = encoder.encode(torch.from_numpy(speech), clip_length=16)
    assert features.num_frames == direct.num_frames == frame_count(len(speech))
    assert features.features.shape == direct.features.shape
    # 16k -> 44.1k -> 16k only loses the band edge: the features stay close to the direct ones
    # (unrelated speech gives a mean difference above the mean magnitude and a correlation near 0.2).
    ours, ref = features.features.flatten(), direct.features.flatten()
    assert (ours - ref).abs().mean() < 0.15 * ref.abs().mean()
    assert torch.corrcoef(torch.stack([ours, ref]))[0, 1] > 0.98


# --- vocal separation hook ---------------------------------------------------------------------------


def test_separator_off_is_logged(parity_dir: Path, encoder: Wav2Vec2AudioEncoder, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="emocast_core.audio"):
        extract_audio_features(parity_dir / "exact_640x71.wav", encoder, clip_length=4)
    assert any("vocal separation is off" in r.getMessage() for r in caplog.records if r.name == "emocast_core.audio")


def test_separator_output_feeds_the_encoder(parity_dir: Path, encoder: Wav2Vec2AudioEncoder) -> None:
    seen: list[torch.Tensor] = []

    def quieter(waveform: torch.Tensor) -> torch.Tensor:
        seen.append(waveform)
        return waveform * 0.5  # normalisation removes the gain: features must not change

    wav = parity_dir / "exact_640x71.wav"
    plain = extract_audio_features(wav, encoder, clip_length=4)
    separated = extract_audio_features(wav, encoder, clip_length=4, separator=quieter)
    assert len(seen) == 1 and seen[0].shape == (45440,)
    assert (separated.features - plain.features).abs().max().item() < 1e-4

    with pytest.raises(ValueError, match="separated vocal stem is silent.*try without vocal separation"):
        extract_audio_features(wav, encoder, clip_length=4, separator=torch.zeros_like)
    with pytest.raises(ValueError, match="mono waveform"):
        extract_audio_features(wav, encoder, clip_length=4, separator=lambda w: w[None])


# --- bad input ---------------------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Audio file not found.*nope.wav"):
        load_audio(tmp_path / "nope.wav")


def test_corrupt_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.wav"
    path.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"Could not decode audio file .*broken\.wav.*corrupt"):
        load_audio(path)


def test_file_without_audio_stream(tmp_path: Path) -> None:
    path = tmp_path / "video_only.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mpeg4", rate=25)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        for _ in range(2):
            frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    with pytest.raises(ValueError, match="has no audio stream"):
        load_audio(path)


def test_empty_audio(tmp_path: Path) -> None:
    path = _write_pcm16_wav(tmp_path / "empty.wav", np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="empty"):
        load_audio(path)


def test_audio_shorter_than_one_frame(tmp_path: Path, speech: np.ndarray) -> None:
    loud = int(np.argmax(np.abs(speech)))
    path = _write_pcm16_wav(tmp_path / "blip.wav", speech[loud : loud + 500])  # 31 ms < 40 ms
    with pytest.raises(ValueError, match="shorter than one video frame"):
        load_audio(path)
    one_frame = load_audio(_write_pcm16_wav(tmp_path / "frame.wav", speech[loud : loud + 640]))  # 40 ms is enough
    assert one_frame.num_samples == 640


@pytest.mark.parametrize("amplitude", [0.0, 1e-6])
def test_silent_audio(tmp_path: Path, amplitude: float) -> None:
    noise = amplitude * np.random.default_rng(0).standard_normal(16000).astype(np.float32)
    path = tmp_path / "silence.wav"
    _write_audio(path, noise[None], 16000, "pcm_f32le")
    with pytest.raises(ValueError, match=r"silence\.wav is silent.*check the recording"):
        load_audio(path)


def test_bad_tensors_and_model_folder(tmp_path: Path, encoder: Wav2Vec2AudioEncoder) -> None:
    with pytest.raises(ValueError, match=r"\(channels, samples\)"):
        AudioClip(torch.zeros(16000), 16000)
    with pytest.raises(ValueError, match="mono waveform"):
        encoder.encode(torch.zeros(2, 16000), clip_length=16)
    with pytest.raises(ValueError, match="silent"):
        encoder.encode(torch.zeros(16000), clip_length=16)
    with pytest.raises(FileNotFoundError, match="config.json"):
        Wav2Vec2AudioEncoder.from_pretrained(tmp_path)
