"""Frame parity with the official EmoCAST pipeline, on the tiny and on the full-size (released) architecture.

Each fixture folder holds the model configs, the preprocessed inputs and the official outputs; the compact
fixtures in tests/fixtures rebuild their weights from a formula (tests/fixtures/README.md). Every field of
`inputs.pt` is honoured, so any further fixture of the same format is checked by this same test:
`EMOCAST_PARITY_FIXTURE=DIR` runs it on DIR instead (a compact folder, or one with `net.safetensors` /
the official `net.pth` and VAE / CLIP weights).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from emocast_core.emotion import EmotionKey, build_emotion_schedule
from emocast_core.preprocess.audio_features import AudioFeatures
from emocast_core.sampling import SamplerInputs, generate_frames
from emocast_core.sampling_settings import SamplingSettings
from emocast_core.scheduler import make_scheduler
from parity_fixture import intermediates, load_expected, load_inputs, models, parity_params, release_memory

VIDEO_TOLERANCE = 2e-3  # the CPU thread count alone moves the official video by 3e-4 (tests/fixtures/README.md)
NOISE_PRED_TOLERANCE = 1e-4
HALF_PRECISION_TOLERANCE = 0.1  # the fixture's fp16-vs-fp32 spread; parity itself is defined in fp32


@pytest.fixture(scope="module", params=parity_params())
def fixture_dir(request: pytest.FixtureRequest) -> Path:
    return request.param


def _run(folder: Path, dtype: torch.dtype = torch.float32, noise_dtype: torch.dtype | None = None):
    """Our pipeline on the fixture on the CPU, with every denoising-UNet output recorded. The models are
    released before returning (the full-size Net alone is about 10 GB in fp32)."""
    inputs, expected = load_inputs(folder), load_expected(folder)
    net, vae, text = models(folder, dtype)

    clip_length = inputs["n_sample_frames"]
    audio = AudioFeatures(inputs["audio_emb"], inputs["audio_length"], clip_length)
    # the prompt verbatim, even if it looks like a timeline
    emotion = build_emotion_schedule(text, [EmotionKey(0.0, inputs["prompt"])], audio.num_padded_frames)
    cond = SamplerInputs(
        reference=inputs["source_image_pixels"], face_region=inputs["face_region"], identity=inputs["face_emb"],
        masks=[inputs["full_mask"], inputs["face_mask"], inputs["lip_mask"]],
        audio=audio,
        num_frames=inputs["audio_length"], emotion=emotion)
    assert tuple(cond.reference.shape[-2:]) == (inputs["height"], inputs["width"])
    settings = SamplingSettings(steps=inputs["steps"], cfg=inputs["cfg"], seed=inputs["seed"],
                                clip_length=clip_length, motion_frames=inputs["n_motion_frames"],
                                weights=tuple(float(w) for w in inputs.get("motion_scale", (1.0, 1.0, 1.0))),
                                noise_dtype=noise_dtype)
    calls = []
    handle = net.denoising_unet.register_forward_hook(lambda m, a, out: calls.append(out.detach().clone()))
    try:
        video = generate_frames(net, vae, make_scheduler(), cond, settings, dtype=dtype)
    finally:
        handle.remove()
        del net, vae, text, emotion, cond
        release_memory()
    return inputs, expected, video, calls


@pytest.fixture(scope="module")
def official_run(fixture_dir: Path):
    yield _run(fixture_dir)
    release_memory()


def test_video_matches_official(official_run):
    inputs, expected, video, _ = official_run
    ours = video.permute(1, 0, 2, 3)  # (3, T, H, W) like the official tensor
    assert ours.shape == expected["video"].shape
    assert ours.shape[1] == inputs["audio_length"]
    diff = (ours - expected["video"]).abs().max().item()
    assert diff <= VIDEO_TOLERANCE, f"max |Δ video| = {diff:.3g}"


def test_first_clip_noise_predictions_match_official(official_run, fixture_dir):
    inputs, expected, _, calls = official_run
    official = intermediates(expected, fixture_dir, "denoising_unet")
    assert len(calls) == len(official) == inputs["steps"] * (inputs["audio_emb"].shape[0] // inputs["n_sample_frames"])
    for ours, theirs in zip(calls[: inputs["steps"]], official[: inputs["steps"]]):
        diff = (ours - theirs["noise_pred"]).abs().max().item()
        assert diff <= NOISE_PRED_TOLERANCE, f"max |Δ noise_pred| = {diff:.3g} at t={theirs['timestep']}"


def test_timesteps_match_official(fixture_dir):
    inputs, expected = load_inputs(fixture_dir), load_expected(fixture_dir)
    scheduler = make_scheduler()
    scheduler.set_timesteps(inputs["steps"])
    assert scheduler.timesteps.tolist() == expected["timesteps"].tolist()


@pytest.mark.parametrize("folder", parity_params(full=False))
def test_half_precision_stays_close_to_the_official_fp32_frames(folder):
    """The fp16 path (what a GPU runs) has no dtype mix-ups: with the fp32 noise it stays within the
    fixture's stated fp16-vs-fp32 spread (0.1)."""
    inputs, expected, video, _ = _run(folder, torch.float16, noise_dtype=torch.float32)
    assert video.dtype == torch.float32
    diff = (video.permute(1, 0, 2, 3) - expected["video"]).abs().max().item()
    assert diff <= HALF_PRECISION_TOLERANCE, f"max |Δ video| in fp16 = {diff:.3g}"
