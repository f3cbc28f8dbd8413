"""The complete generation path on tiny models saved in the real formats, with a real photo and real speech."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from emocast_core.model_paths import ModelPaths
from emocast_core.generation_steps import trim_audio
from emocast_core.pipeline import GenerationCancelled, GenerationRequest, generate
from emocast_core.runtime import EmoCASTModels, onnx_providers, resolve_dtype
from emocast_core.preprocess.audio import AudioClip
from emocast_core.sampling_settings import SamplingSettings
from emocast_core.testing.speech import synthesize_speech
from emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def models(model_dir):
    return EmoCASTModels.load(ModelPaths.resolve(model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def portrait():
    from skimage import data
    return data.astronaut()


@pytest.fixture(scope="module")
def speech():
    wave = synthesize_speech("Hello there.")
    return AudioClip(torch.from_numpy(wave)[None], 16000)


def _request(portrait, audio, **kw):
    sampling = SamplingSettings(steps=kw.pop("steps", 1), clip_length=8, seed=kw.pop("seed", 7))
    return GenerationRequest(image=portrait, audio=audio, size=TINY_SIZE, sampling=sampling, **kw)


def test_generate_frames_audio_and_progress(models, portrait, speech):
    events = []
    result = generate(models, _request(portrait, speech, emotion="0: calm | 0.4: furious", steps=2),
                      progress=events.append)
    expected_frames = math.ceil(speech.num_samples / 16000 * 25)
    assert result.frames.shape == (expected_frames, 3, TINY_SIZE, TINY_SIZE)
    assert result.frames.dtype == torch.float32
    assert 0.0 <= result.frames.min() and result.frames.max() <= 1.0
    assert result.frames.std() > 0.01  # not a constant image
    assert result.fps == 25
    assert result.audio.num_samples == round(expected_frames / 25 * 16000)
    # ceil(samples / 640) frames: the last frame's audio is padded with silence
    n = speech.num_samples
    torch.testing.assert_close(result.audio.waveform[:, :n], speech.waveform)
    assert result.audio.waveform[:, n:].abs().max() == 0
    clips = math.ceil(expected_frames / 8)
    assert [(e.clip, e.step) for e in events] == [(c, s) for c in range(clips) for s in (1, 2)]
    assert [e.done for e in events] == list(range(1, 2 * clips + 1)) and events[-1].done == events[-1].total
    assert events[0].clips == clips


def test_generation_is_seeded(models, portrait, speech):
    a = generate(models, _request(portrait, speech, seed=3)).frames
    b = generate(models, _request(portrait, speech, seed=3)).frames
    c = generate(models, _request(portrait, speech, seed=4)).frames
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-4


def test_cancel_between_steps(models, portrait, speech):
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(GenerationCancelled):
        generate(models, _request(portrait, speech, steps=3), cancel=cancel)
    assert len(calls) == 3


def test_bad_inputs_get_specific_errors(models, portrait, speech):
    silent = AudioClip(torch.zeros(1, 16000), 16000)
    with pytest.raises(ValueError, match="silent"):
        generate(models, _request(portrait, silent))
    blank = np.full((256, 256, 3), 128, dtype=np.uint8)
    with pytest.raises(ValueError, match="[Nn]o face"):
        generate(models, _request(blank, speech))
    with pytest.raises(ValueError, match="multiple of 64"):
        generate(models, GenerationRequest(image=portrait, audio=speech, size=100))
    with pytest.raises(ValueError, match="cfg must be above 1.0"):
        generate(models, GenerationRequest(image=portrait, audio=speech, size=TINY_SIZE,
                                           sampling=SamplingSettings(cfg=1.0, clip_length=8)))
    with pytest.raises(ValueError, match="77"):
        generate(models, _request(portrait, speech, emotion="very " * 80 + "happy"))


def test_missing_model_files_are_reported_together(tmp_path):
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError) as err:
        ModelPaths.resolve(tmp_path)
    text = str(err.value)
    for expected in ("emocast.safetensors", "clip", "wav2vec2", "face_analysis", "vae/config.json",
                     "huggingface.co/Jmaomao/EmoCAST"):
        assert expected in text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ModelPaths.resolve(tmp_path / "nowhere")


def test_trim_audio_pads_and_cuts():
    clip = AudioClip(torch.ones(2, 1000), 8000)
    assert trim_audio(clip, 2).num_samples == 640
    longer = trim_audio(clip, 4)
    assert longer.num_samples == 1280 and longer.waveform[:, 1000:].abs().max() == 0


def test_onnx_providers_are_those_installed(monkeypatch):
    import onnxruntime
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert onnx_providers(torch.device("cuda")) == ("CPUExecutionProvider",)
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_providers(torch.device("cuda")) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert onnx_providers(torch.device("cpu")) == ("CPUExecutionProvider",)


def test_dtype_choice():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_fp16_on_the_cpu_falls_back_to_fp32_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="emocast_core.runtime"):
        assert resolve_dtype("fp16", torch.device("cpu")) == torch.float32
    (record,) = [r for r in caplog.records if r.name == "emocast_core.runtime"]
    assert record.levelname == "WARNING" and "\n" not in record.getMessage()
    assert "slower" in record.getMessage() and "using fp32" in record.getMessage()
    assert "'fp16-force' (--dtype fp16-force)" in record.getMessage()  # how to force it
    caplog.clear()
    with caplog.at_level("WARNING", logger="emocast_core.runtime"):
        assert resolve_dtype("fp16", torch.device("cuda")) == torch.float16  # a GPU: as asked, silently
        assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16  # bf16 on the CPU is fine
    assert not caplog.records


def test_forced_fp16_runs_on_the_cpu(caplog):
    from emocast_core.cli import COMMANDS
    from emocast_core.cli.table import build_parser

    with caplog.at_level("WARNING", logger="emocast_core.runtime"):
        assert resolve_dtype("fp16-force", torch.device("cpu")) == torch.float16
        assert resolve_dtype("fp16-force", torch.device("cuda")) == torch.float16
    assert not caplog.records
    parser = build_parser(COMMANDS, "emocast", "test")
    args = parser.parse_args(["generate", "--models", "m", "--image", "i.png", "--audio", "a.wav", "--emotion", "calm",
                              "--out", "o.mp4", "--dtype", "fp16-force"])
    assert args.dtype == "fp16-force"


def test_vocal_separator_in_the_model_folder_is_used(tmp_path, portrait, speech, caplog):
    """A separator/ folder (here an identity MDX-Net model with the real signature) is found and applied."""
    root = write_tiny_models(tmp_path / "models", separator=True)
    loaded = EmoCASTModels.load(ModelPaths.resolve(root), device="cpu", dtype="fp32")
    assert loaded.separator is not None
    calls = []
    real = loaded.separator.separate
    loaded.separator.separate = lambda clip: calls.append(clip) or real(clip)
    with_sep = generate(loaded, _request(portrait, speech)).frames
    assert len(calls) == 1 and calls[0].sample_rate == speech.sample_rate
    calls.clear()
    without = generate(loaded, _request(portrait, speech, separate_vocals=False)).frames
    assert calls == [] and with_sep.shape == without.shape
