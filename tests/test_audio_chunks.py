"""Audio of any length: wav2vec2 over overlapping chunks, audio windows built clip by clip.

Long recordings run the wav2vec2 conv extractor in exact chunks and the transformer over overlapping windows
(emocast_core/preprocess/audio_features.py); audio that fits one window must stay bit-identical to the
release's single pass, and the sampler must build the audio windows one clip at a time.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from conftest import FIXTURES
from emocast_core.preprocess.audio import frame_count, load_audio
from emocast_core.preprocess.audio_features import (
    CHUNK_SECONDS,
    CONTEXT_SECONDS,
    AudioFeatures,
    Wav2Vec2AudioEncoder,
    _chunked_conv_features,
)
from emocast_core.testing.speech import synthesize_speech

# The stated seam tolerance: chunked vs one-pass features, as max |diff| (the features are post-LayerNorm, std
# ~1 per layer, max |f| ~2.5 tiny / ~6 full size) and as RMS(diff) / RMS(features) of the worst layer. The
# weights are random (their attention is spread over the whole recording, so cutting the context moves every
# frame, not only those at a seam; a trained wav2vec2 attends more locally). Measured on the fixture speech
# repeated to 90 s with the defaults (30 s chunks + 5 s context): tiny wav2vec2 0.109 / 0.024, full-size
# wav2vec2-base architecture 0.152 / 0.035 (RMS ratio 0.009 in layer 1 growing to 0.035 in layer 12).
DEFAULT_SEAM_MAX_ABS = 0.2
DEFAULT_SEAM_RMS_RATIO = 0.04
# The same with 2 s chunks + 1 s context on 10 s (6 windows), the fast test: tiny 0.49 / 0.144.
SEAM_MAX_ABS = 0.75
SEAM_RMS_RATIO = 0.18


@pytest.fixture(scope="module")
def encoder() -> Wav2Vec2AudioEncoder:
    return Wav2Vec2AudioEncoder.from_pretrained(FIXTURES / "parity_audio" / "wav2vec2-tiny")


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    """10 s of real speech: the fixture recording, repeated (a file, so the same samples in every run)."""
    wave = load_audio(FIXTURES / "parity_audio" / "speech_16k.wav").waveform[0].numpy()
    return torch.from_numpy(np.resize(wave, 10 * 16000).copy())


def _variant(encoder: Wav2Vec2AudioEncoder, **kw) -> Wav2Vec2AudioEncoder:
    return Wav2Vec2AudioEncoder(encoder.model, encoder.processor, **kw)


def _release_features(encoder: Wav2Vec2AudioEncoder, waveform: torch.Tensor, clip_length: int) -> torch.Tensor:
    """The single-pass computation as it was before chunking existed (kept here verbatim as the reference)."""
    model = encoder.model
    normalized = encoder.normalize(waveform)
    num_frames = frame_count(normalized.shape[0])
    padded = -(-num_frames // clip_length) * clip_length
    normalized = F.pad(normalized, (0, (padded - num_frames) * 640))
    with torch.inference_mode():
        conv = model.feature_extractor(normalized[None])
        conv = F.interpolate(conv, size=padded, mode="linear", align_corners=True)
        projected, _ = model.feature_projection(conv.transpose(1, 2))
        captured = []
        handles = [layer.register_forward_hook(
            lambda _m, _i, out: captured.append(out[0] if isinstance(out, tuple) else out))
            for layer in model.encoder.layers]
        try:
            last = model.encoder(projected)[0]
        finally:
            for handle in handles:
                handle.remove()
        captured[-1] = last
        return torch.stack(captured, dim=2)[0].cpu()


def _random_encoder(**config) -> Wav2Vec2AudioEncoder:
    """A small random wav2vec2 of another layout than the fixture's (e.g. layer-norm conv, stable layer norm)."""
    torch.manual_seed(0)
    cfg = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
               conv_dim=(8,) * 7, conv_stride=(5, 2, 2, 2, 2, 2, 2), conv_kernel=(10, 3, 3, 3, 3, 2, 2),
               num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=32)
    cfg.update(config)
    processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                         do_normalize=True, return_attention_mask=False)
    return Wav2Vec2AudioEncoder(Wav2Vec2Model(Wav2Vec2Config(**cfg)), processor)


# --- bit-identical below one window --------------------------------------------------------------------


def test_defaults_are_documented_sizes() -> None:
    assert (CHUNK_SECONDS, CONTEXT_SECONDS) == (30.0, 5.0)
    enc = _random_encoder()
    assert enc.transformer_windows(1000) == [(0, 1000, 0, 1000)]  # 40 s: one pass
    assert len(enc.transformer_windows(1008)) == 2


@pytest.mark.parametrize("clip_length", [4, 16])
def test_short_audio_is_bit_identical_to_the_single_pass(encoder, speech, clip_length) -> None:
    features = encoder.encode(speech, clip_length=clip_length).features
    assert torch.equal(features, _release_features(encoder, speech, clip_length))
    assert torch.equal(features, _variant(encoder, chunk_seconds=None).encode(speech, clip_length).features)


@pytest.mark.parametrize("config", [{}, {"feat_extract_norm": "layer", "do_stable_layer_norm": True}],
                         ids=["post-ln", "stable-ln"])
def test_one_window_is_bit_identical_for_other_layouts(speech, config) -> None:
    enc = _random_encoder(**config)
    assert torch.equal(enc.encode(speech, 16).features, _release_features(enc, speech, 16))


def test_audio_filling_exactly_one_window_takes_the_single_pass(encoder, speech) -> None:
    # chunk 1 s + 2 x 0.4 s context = 45 frames = 1.8 s: 1.8 s of audio (45 frames, clips of 5) is one pass,
    # one sample more (46 frames, padded to 50) is chunked.
    small = _variant(encoder, chunk_seconds=1.0, context_seconds=0.4)
    fits = speech[:28800]
    assert small.transformer_windows(45) == [(0, 45, 0, 45)]
    assert torch.equal(small.encode(fits, 5).features, _release_features(encoder, fits, 5))
    longer = speech[:28801]
    assert len(small.transformer_windows(50)) == 2
    assert not torch.equal(small.encode(longer, 5).features, _release_features(encoder, longer, 5))


# --- the windows -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("frames", [51, 99, 100, 101, 250, 1001, 15008])
@pytest.mark.parametrize(("chunk", "context"), [(1.0, 0.5), (2.0, 1.0), (CHUNK_SECONDS, CONTEXT_SECONDS), (2.0, 0.0)])
def test_windows_cover_every_frame_once(encoder, frames, chunk, context) -> None:
    enc = _variant(encoder, chunk_seconds=chunk, context_seconds=context)
    core, ctx = round(chunk * 25), round(context * 25)
    windows = enc.transformer_windows(frames)
    if frames <= core + 2 * ctx:
        assert windows == [(0, frames, 0, frames)]
        return
    cores = [(a, b) for _, _, a, b in windows]
    assert cores[0][0] == 0 and cores[-1][1] == frames
    assert all(prev[1] == nxt[0] for prev, nxt in zip(cores, cores[1:]))
    sizes = [b - a for a, b in cores]
    assert max(sizes) <= core and max(sizes) - min(sizes) <= 1  # cores split the recording evenly
    for start, stop, a, b in windows:
        assert (start, stop) == (max(0, a - ctx), min(frames, b + ctx))


# --- chunked conv extractor: exact up to rounding ------------------------------------------------------


@pytest.mark.parametrize("config", [None, {"conv_bias": True}, {"feat_extract_norm": "layer"}],
                         ids=["group-norm", "group-norm-bias", "layer-norm"])
@pytest.mark.parametrize("chunk_frames", [1, 7, 37, 100_000])
def test_chunked_conv_extractor_matches_one_pass(encoder, speech, config, chunk_frames) -> None:
    enc = encoder if config is None else _random_encoder(**config)
    x = enc.normalize(speech)[None]
    with torch.inference_mode():
        full = enc.model.feature_extractor(x)
        chunked = _chunked_conv_features(enc.model.feature_extractor, x, chunk_frames)
    assert chunked.shape == full.shape
    assert (chunked - full).abs().max().item() <= 1e-6 * full.abs().max().item() + 1e-6


def test_group_norm_statistics_span_the_whole_recording(encoder, speech) -> None:
    # A loud second half changes the first half's conv features (GroupNorm over the whole recording); the
    # chunked extractor must see that too, not normalise each chunk on its own.
    x = encoder.normalize(speech)[None].clone()
    x[:, x.shape[1] // 2:] *= 4
    with torch.inference_mode():
        full = encoder.model.feature_extractor(x)
        first_half_alone = encoder.model.feature_extractor(x[:, : x.shape[1] // 2])
        chunked = _chunked_conv_features(encoder.model.feature_extractor, x, 50)
    n = first_half_alone.shape[-1] - 1
    assert (first_half_alone[..., :n] - full[..., :n]).abs().max() > 1e-2
    assert (chunked - full).abs().max().item() <= 1e-6 * full.abs().max().item() + 1e-6


# --- across a seam ---------------------------------------------------------------------------------------


def test_stitching_is_exact_for_a_local_transformer(encoder, speech) -> None:
    # With the attention outputs zeroed the transformer only sees +-8 frames (its positional convolution):
    # with more context than that, the chunked features must equal the single pass up to rounding, which
    # pins down the windows' alignment and the stitching.
    local = copy.deepcopy(encoder.model)
    for layer in local.encoder.layers:
        torch.nn.init.zeros_(layer.attention.out_proj.weight)
        torch.nn.init.zeros_(layer.attention.out_proj.bias)
    one_pass = Wav2Vec2AudioEncoder(local, encoder.processor, chunk_seconds=None).encode(speech, 16).features
    chunked_enc = Wav2Vec2AudioEncoder(local, encoder.processor, chunk_seconds=1.0, context_seconds=0.5)
    assert len(chunked_enc.transformer_windows(one_pass.shape[0])) == 11
    chunked = chunked_enc.encode(speech, 16).features
    assert (chunked - one_pass).abs().max().item() < 1e-4
    # Without context the positional convolution sees the cut.
    no_context = Wav2Vec2AudioEncoder(local, encoder.processor, chunk_seconds=1.0, context_seconds=0.0)
    assert (no_context.encode(speech, 16).features - one_pass).abs().max().item() > 1e-2


def _seam_error(encoder: Wav2Vec2AudioEncoder, waveform: torch.Tensor, windows: int, **chunking) -> tuple[float, float]:
    """(max |diff|, worst layer's RMS(diff) / RMS(features)) of the chunked vs the one-pass features."""
    one_pass = _variant(encoder, chunk_seconds=None).encode(waveform, 16)
    chunked_encoder = _variant(encoder, **chunking)
    assert len(chunked_encoder.transformer_windows(one_pass.num_padded_frames)) == windows
    chunked = chunked_encoder.encode(waveform, 16)
    assert (chunked.num_frames, chunked.num_padded_frames) == (one_pass.num_frames, one_pass.num_padded_frames)
    diff = chunked.features - one_pass.features
    ratio = diff.square().mean(dim=(0, 2)).sqrt() / one_pass.features.square().mean(dim=(0, 2)).sqrt()
    return diff.abs().max().item(), ratio.max().item()


def test_seams_stay_within_tolerance(encoder, speech) -> None:
    max_abs, rms_ratio = _seam_error(encoder, speech, 6, chunk_seconds=2.0, context_seconds=1.0)
    assert max_abs <= SEAM_MAX_ABS and rms_ratio <= SEAM_RMS_RATIO, (max_abs, rms_ratio)


def test_default_chunks_stay_within_the_stated_tolerance(encoder, speech) -> None:
    ninety_seconds = torch.from_numpy(np.resize(speech.numpy(), 90 * 16000).copy())
    max_abs, rms_ratio = _seam_error(encoder, ninety_seconds, 4)  # 2256 frames: cores of 564, windows <= 814
    assert max_abs <= DEFAULT_SEAM_MAX_ABS and rms_ratio <= DEFAULT_SEAM_RMS_RATIO, (max_abs, rms_ratio)


# --- windows per clip -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("frames", "clip_length"), [(24, 8), (10, 5), (16, 16), (6, 1), (12, 4)])
@pytest.mark.parametrize("window", [1, 3, 5, 7])
def test_clip_windows_equal_slices_of_all_windows(frames, clip_length, window) -> None:
    features = torch.randn(frames, 3, 4, generator=torch.Generator().manual_seed(frames))
    audio = AudioFeatures(features, num_frames=frames - 1, clip_length=clip_length)
    everything = audio.windows(window)
    for clip in range(audio.num_clips):
        part = audio.clip_windows(clip, window)
        assert part.shape == (clip_length, window, 3, 4)
        assert torch.equal(part, everything[clip * clip_length:(clip + 1) * clip_length])
    half = window // 2
    first, last = audio.clip_windows(0, window), audio.clip_windows(audio.num_clips - 1, window)
    assert torch.equal(first[0, :half + 1], features[0].expand(half + 1, -1, -1))  # clamped at the start
    assert torch.equal(last[-1, half:], features[-1].expand(half + 1, -1, -1))  # and at the end
    assert torch.equal(audio.frame_windows(2, 5, window), everything[2:5])
    with pytest.raises(IndexError):
        audio.clip_windows(audio.num_clips, window)
    with pytest.raises(IndexError):
        audio.clip_windows(-1, window)


def test_clip_windows_reject_even_window() -> None:
    with pytest.raises(ValueError, match="odd"):
        AudioFeatures(torch.zeros(8, 2, 3), num_frames=8, clip_length=4).clip_windows(0, 4)


def test_sampler_never_builds_the_whole_video_windows(tmp_path_factory, monkeypatch) -> None:
    from skimage import data

    from emocast_core.model_paths import ModelPaths
    from emocast_core.pipeline import GenerationRequest, generate
    from emocast_core.preprocess.audio import AudioClip
    from emocast_core.runtime import EmoCASTModels
    from emocast_core.sampling_settings import SamplingSettings
    from emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models

    models = EmoCASTModels.load(ModelPaths.resolve(write_tiny_models(tmp_path_factory.mktemp("models"))),
                                device="cpu", dtype="fp32")
    wave = synthesize_speech("Hello there.")
    audio = AudioClip(torch.from_numpy(wave)[None], 16000)

    def refuse(self, window=5):
        raise AssertionError("the sampler built the whole video's audio windows")

    built = []
    per_clip = AudioFeatures.clip_windows

    def record(self, clip, window=5):
        out = per_clip(self, clip, window)
        built.append((clip, tuple(out.shape)))
        return out

    monkeypatch.setattr(AudioFeatures, "windows", refuse)
    monkeypatch.setattr(AudioFeatures, "clip_windows", record)
    request = GenerationRequest(image=data.astronaut(), audio=audio, size=TINY_SIZE,
                                sampling=SamplingSettings(steps=1, clip_length=8, seed=7))
    result = generate(models, request)
    ap = models.net.config.audio_projection
    clips = -(-result.frames.shape[0] // 8)
    assert clips >= 2
    assert built == [(c, (8, ap.window, ap.layers, ap.channels)) for c in range(clips)]
