"""Bad input is refused early and clearly: an `error:` line and exit code 1, no traceback, nothing created, and
no model loaded for a bad setting. The library and the ComfyUI nodes refuse the same values by name."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfy_stubs import node  # noqa: F401  (loads the pack)
from emocast_core import runtime
from emocast_core.cli import main
from emocast_core.cli.generate import load_image
from emocast_core.cli.selftest import write_wav
from emocast_core.config import NetConfig
from emocast_core.sampling_settings import MAX_SEED, SamplingSettings
from emocast_core.testing.speech import synthesize_speech
from emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models



@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A portrait and a short speech file (no models: the settings must fail before any are needed)."""
    from skimage import data

    root = tmp_path_factory.mktemp("bad_input")
    Image.fromarray(data.astronaut()).save(root / "portrait.png")
    write_wav(root / "speech.wav", synthesize_speech("One two three."), 16000)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("bad_input_models") / "models")


def _args(root: Path, models: Path, out: Path, *extra: str) -> list[str]:
    return ["-q", "generate", "--models", str(models), "--image", str(root / "portrait.png"), "--audio",
            str(root / "speech.wav"), "--out", str(out), "--steps", "1", "--size", str(TINY_SIZE), "--clip-length",
            "8", "--device", "cpu", *extra]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("extra, message", [
    (("--steps", "0"), "steps must be from 1 to 1000 (got 0)"),
    (("--steps", "1001"), "steps must be from 1 to 1000 (got 1001)"),
    (("--cfg", "nan"), "cfg must be a finite number (got nan)"),
    (("--cfg", "inf"), "cfg must be a finite number (got inf)"),
    (("--cfg", "1.0"), "cfg must be above 1.0"),
    (("--pose-weight", "nan"), "the pose weight must be a finite number (got nan)"),
    (("--lip-weight", "1e30"), "the lip weight must be between 0 and 10.0 (got 1e+30)"),
    (("--seed", "-1"), f"seed must be from 0 to {MAX_SEED} (got -1)"),
    (("--seed", str(2**64)), f"seed must be from 0 to {MAX_SEED} (got {2**64})"),
    (("--size", "65536"), "size must be a multiple of 64 from 64 to 1024 (got 65536)"),
    (("--size", "100"), "size must be a multiple of 64 from 64 to 1024 (got 100)"),
    (("--clip-length", "40"), "clip_length must be from 3 to 30 (got 40): frames generated together"),
    (("--clip-length", "2"), "clip_length must be from 3 to 30 (got 2)"),
    (("--crossfade", "-1"), "crossfade must be >= 0 seconds"),
    (("--strength", "nan"), "emotion strength must be a finite number"),
    (("--emotion", "0: calm | 0: angry"), "does not come after the previous key"),
    (("--device", "foo"), "unknown device 'foo'; use auto, cpu, cuda or cuda:N"),
])
def test_a_bad_setting_fails_before_any_model_is_loaded(inputs, tmp_path, monkeypatch, capsys, extra, message):
    def must_not_load(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    monkeypatch.setattr(runtime.EmoCASTModels, "load", must_not_load)
    out = tmp_path / "new_folder" / "talking.mp4"
    before = sorted(tmp_path.iterdir())
    # the model folder does not even exist: settings are checked before anything is read
    assert main(_args(inputs, tmp_path / "no_models", out, *extra)) == 1
    assert message in _error(capsys)
    assert sorted(tmp_path.iterdir()) == before  # no folder created for --out


def test_paths_of_the_wrong_kind_say_so(inputs, models, tmp_path, capsys):
    folder_out = tmp_path / "video.mp4"
    folder_out.mkdir()
    assert main(_args(inputs, models, folder_out)) == 1
    assert f"--out {folder_out} is a folder; give the path of the .mp4 file" in _error(capsys)
    args = _args(inputs, models, tmp_path / "a.mp4")
    args[args.index("--image") + 1] = str(tmp_path)
    assert main(args) == 1
    assert f"the portrait {tmp_path} is a folder; give the path of an image file" in _error(capsys)
    args = _args(inputs, models, tmp_path / "a.mp4")
    args[args.index("--audio") + 1] = str(tmp_path)
    assert main(args) == 1
    assert f"the audio {tmp_path} is a folder; give the path of a speech file" in _error(capsys)
    assert main(_args(inputs, models / "emocast.safetensors", tmp_path / "a.mp4")) == 1
    assert f"the model folder {models / 'emocast.safetensors'} is a file" in _error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_a_tiny_portrait_fails_before_any_model_is_loaded(inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(runtime.EmoCASTModels, "load", lambda *a, **k: pytest.fail("a model was loaded"))
    Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(tmp_path / "tiny.png")
    args = _args(inputs, tmp_path, tmp_path / "a.mp4")
    args[args.index("--image") + 1] = str(tmp_path / "tiny.png")
    assert main(args) == 1
    assert "the portrait is 60x40 pixels; both sides must be at least" in _error(capsys)


def test_sixteen_bit_portraits_keep_their_tones(tmp_path):
    ramp = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I;16")
    rgb = load_image(tmp_path / "grey16.png")
    assert rgb.shape == (48, 64, 3) and rgb.dtype == np.uint8
    assert np.array_equal(rgb[..., 0], rgb[..., 2])
    np.testing.assert_allclose(rgb[..., 0], ramp / 257, atol=0.5)  # PIL's own convert saturates 89 % to 255
    assert (rgb == 255).mean() < 0.01


def test_an_image_over_the_pixel_limit_is_refused(inputs, models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the astronaut has 512 x 512: over twice the limit
    assert main(_args(inputs, models, tmp_path / "out" / "a.mp4")) == 1
    assert "has more pixels than is safe to open" in _error(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("content, message", [
    ([1, 2], "no 'unet_config' section"),
    ({"unet_config": [1]}, "section 'unet_config' must be a JSON object, got list"),
    ({"unet_config": {"block_out_channels": 5}}, "unet_config.block_out_channels must be a list, got int"),
    ({"unet_config": {}, "aux": {"audio_proj": 3}}, "section 'aux.audio_proj' must be a JSON object"),
    ({"unet_config": {}, "aux": {"audio_proj": {"seq_len": "x"}}}, "value window='x' must be a number"),
])
def test_a_config_of_the_wrong_shape_is_named(models, tmp_path, capsys, content, message):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps(content))
    assert main(["inspect", str(models / "emocast.safetensors"), "--config", str(bad)]) == 1
    assert f"error: {bad}: model config" in (line := _error(capsys)) and message in line
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        NetConfig.from_json(bad)


def test_broken_model_files_are_named(inputs, models, tmp_path, capsys):
    import shutil

    broken = tmp_path / "models"
    shutil.copytree(models, broken)
    onnx = sorted((broken / "face_analysis").rglob("*.onnx"))[0]
    onnx.write_bytes(b"not an onnx model" * 10)
    assert main(_args(inputs, broken, tmp_path / "a.mp4")) == 1
    line = _error(capsys)
    assert f"the face-analysis model {onnx} cannot be loaded" in line and "download it again" in line

    shutil.rmtree(broken)
    shutil.copytree(models, broken)
    weights = broken / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert main(_args(inputs, broken, tmp_path / "a.mp4")) == 1
    line = _error(capsys)
    assert f"the VAE in {broken / 'vae'} cannot be loaded" in line and "stabilityai/sd-vae-ft-mse" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_convert_onto_a_folder_fails_before_reading_the_checkpoint(models, tmp_path, monkeypatch, capsys):
    from emocast_core.checkpoints import net_file

    monkeypatch.setattr(net_file, "load_state_dict", lambda *a, **k: pytest.fail("the checkpoint was read"))
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    assert main(["convert", str(models / "emocast.safetensors"), str(folder)]) == 1
    assert f"the output {folder} is a folder" in _error(capsys)


def test_a_layout_of_another_config_says_how_to_pass_it(models, capsys):
    assert main(["inspect", str(models / "emocast.safetensors"), "--config",
                 str(Path(__file__).parents[1] / "emocast_core" / "configs" / "full.json")]) == 1
    out = capsys.readouterr().out
    assert "matches the tiny test config instead: use that config (as config.json in the model folder, or " \
           "--config / --tiny for convert and inspect)" in out


def test_timeline_keys_after_the_speech_are_reported(inputs, models, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="emocast_core.generation_steps"):
        assert main(_args(inputs, models, tmp_path / "a.mp4", "--emotion", "0: calm | 30: angry | 45: sad")) == 0
    assert "key(s) at 30 s, 45 s start after the end of the speech" in caplog.text


# ---- the same checks in ComfyUI, at queue time -------------------------------------------------------------------

def test_nodes_validate_their_widgets_at_queue_time():
    sampler, face, emotion = node("EmoCASTSampler"), node("EmoCASTFace"), node("EmoCASTEmotion")
    release = SamplingSettings()
    assert sampler.VALIDATE_INPUTS(steps=release.steps, cfg=release.cfg, seed=release.seed) is True
    assert sampler.VALIDATE_INPUTS(cfg=math.nan) == "cfg must be a finite number, got nan"
    assert sampler.VALIDATE_INPUTS(lip_weight=math.inf) == "lip_weight must be a finite number, got inf"
    assert sampler.VALIDATE_INPUTS(steps=0) == "steps must be between 1 and 200, got 0"
    assert sampler.VALIDATE_INPUTS(steps=None, seed=None) is True  # linked inputs are checked when they run
    assert face.VALIDATE_INPUTS(size=512) is True
    assert face.VALIDATE_INPUTS(size=100).startswith("size must be a multiple of 64")
    assert emotion.VALIDATE_INPUTS(text="0: calm | 2.0: angry", crossfade=0.5, strength=1.0) is True
    assert "does not come after the previous key" in emotion.VALIDATE_INPUTS(text="0: a | 0: b")
    assert emotion.VALIDATE_INPUTS(strength=math.nan) == "strength must be a finite number, got nan"


def test_the_comfyui_image_path_keeps_fine_tones():
    """ComfyUI's IMAGE is float in [0, 1] (its Load Image scales 16-bit files itself): the portrait is rounded,
    never saturated."""
    import torch

    from emocast_pack.nodes import tensors

    ramp = torch.linspace(0, 1, 48 * 64).reshape(1, 48, 64, 1).expand(1, 48, 64, 3)
    portrait = tensors.image_to_portrait(ramp)
    assert portrait.dtype == np.uint8 and portrait.shape == (48, 64, 3)
    np.testing.assert_array_equal(portrait[..., 1], np.round(ramp[0, ..., 1].numpy() * 255).astype(np.uint8))
    assert (portrait == 255).mean() < 0.01
