"""Training: metadata and text bank, emotion-aware sampling, datasets, loss, dropouts, trainable sets,
an overfit check and checkpoints that the inference loader accepts (docs/model.md §6)."""
from __future__ import annotations

import dataclasses
import json
import logging
import random
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `training` is run from the repository root, not installed
    sys.path.insert(0, str(ROOT))

from emocast_core import checkpoints as ck  # noqa: E402
from emocast_core.cli import main as emocast_cli  # noqa: E402
from emocast_core.config import NetConfig  # noqa: E402
from emocast_core.emotion import EmotionTextEncoder  # noqa: E402
from emocast_core.models.denoising_unet import AudioAttentionInputs  # noqa: E402
from emocast_core.models.net import build_net  # noqa: E402
from emocast_core.models.reference_attention import ReferencePairing, ReferenceReader  # noqa: E402
from emocast_core.scheduler import make_scheduler, make_training_scheduler  # noqa: E402
from emocast_core.testing.tiny_models import write_clip, write_vae  # noqa: E402
from training.__main__ import main as training_cli  # noqa: E402
from training.config import apply_overrides, config_from_dict, load_stage_config  # noqa: E402
from training.data.datasets import (  # noqa: E402
    EmotionAwarePairSampler, Stage1Dataset, Stage2Dataset, load_frame, load_tensor_file,
)
from training.data.metadata import (  # noqa: E402
    EMOTIONS, INTENSITIES, MAX_TEXT_CHARS, ClipMeta, EmotiveTextBank, LanguageModelTextGenerator,
    describe_clips, discover_clips, load_clip, normalize_emotion, save_clip_meta,
)
from training.losses import (  # noqa: E402
    diffusion_targets, min_snr_weights, offset_noise, snr, weighted_loss,
)
from training.data.prepare import (  # noqa: E402
    ClipLabel, Preparer, PrepareSettings, link_neutral_videos, parse_mead_path, resample_indices,
)
from training.progressive import load_progressive_config, phase_configs, run_progressive  # noqa: E402
from training.runner import load_stage1_weights, save_checkpoint, select_clips, train  # noqa: E402
from training.smoke import make_synthetic_dataset, smoke_config  # noqa: E402
from training.stages import (  # noqa: E402
    Dropouts, Stage1Settings, Stage2Settings, TrainingModels, configure_trainable, draw_stage1_dropouts,
    draw_stage2_dropouts, stage1_net_config, stage1_step, stage2_step,
    trainable_parameter_names,
)
from torch.utils.data import default_collate  # noqa: E402

SIZE = 64  # pixels: latents 8x8, the tiny UNet's deepest level 1x1


# ---- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to gain from intra-op threads, and on a busy 2-core machine
    spinning OpenMP threads made these tests ~8x slower; restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def helpers(tmp_path_factory) -> Path:
    """Tiny VAE and CLIP folders in the real formats."""
    folder = tmp_path_factory.mktemp("helpers")
    write_vae(folder / "vae")
    write_clip(folder / "clip")
    return folder


@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    make_synthetic_dataset(root, size=SIZE, frames=16, seed=0)
    return root


@pytest.fixture(scope="module")
def clips(dataset_root):
    return discover_clips([dataset_root])


def _models(helpers: Path, net_config: NetConfig) -> TrainingModels:
    torch.manual_seed(0)
    vae = AutoencoderKL.from_pretrained(helpers / "vae", local_files_only=True).requires_grad_(False)
    text = EmotionTextEncoder.from_pretrained(helpers / "clip")
    return TrainingModels(build_net(net_config), vae, text, make_training_scheduler())


def _meta(clip_id, identity, emotion, frames=40, **kw) -> ClipMeta:
    return ClipMeta(clip_id=clip_id, identity=identity, emotion=emotion, num_frames=frames, **kw)


# ---- metadata and emotive texts ------------------------------------------------------------------

def test_clip_meta_round_trips_and_rejects_bad_fields(tmp_path):
    meta = _meta("m003_ang_3_001", "m003", "ang", intensity=3, texts=["A person is furious."],
                 neutral_video="m003_neu_1_001", source="MEAD")
    assert meta.emotion == "angry" and meta.texts == ("A person is furious.",)
    folder = tmp_path / meta.clip_id
    save_clip_meta(meta, folder)
    assert json.loads((folder / "meta.json").read_text())["texts"] == ["A person is furious."]
    loaded = load_clip(folder)
    assert loaded.meta == meta and loaded.frames_dir == folder / "frames"
    assert loaded.region_masks == (folder / "masks/pose.png", folder / "masks/face.png", folder / "masks/lip.png")

    with pytest.raises(ValueError, match="unknown emotion 'joy'"):
        _meta("a", "x", "joy")
    with pytest.raises(ValueError, match=r"intensity must be one of \(1, 2, 3\)"):
        _meta("a", "x", "happy", intensity=4)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['emo'\]"):
        ClipMeta.from_dict({"clip_id": "a", "identity": "x", "emotion": "sad", "num_frames": 3, "emo": 1})
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['num_frames'\]"):
        ClipMeta.from_dict({"clip_id": "a", "identity": "x", "emotion": "sad"})
    save_clip_meta(meta, tmp_path / "renamed")
    with pytest.raises(ValueError, match="differs from its folder name 'renamed'"):
        load_clip(tmp_path / "renamed")
    assert [normalize_emotion(c) for c in ("neu", "hap", "sad", "sur", "fea", "dis", "ang", "con")] == list(EMOTIONS)


def test_text_bank_has_many_short_phrasings_per_emotion_and_intensity():
    bank = EmotiveTextBank()
    for emotion in EMOTIONS:
        for intensity in INTENSITIES:
            texts = bank.phrasings(emotion, intensity)
            assert len(texts) >= 20 and len(set(texts)) == len(texts)
            for text in texts:
                assert text.isascii() and len(text) <= MAX_TEXT_CHARS, text
    assert "The portrait is watching a horror movie with jump scares." in bank.phrasings("fear", 3)
    assert "A person is talking with happy emotion." in bank.phrasings("happy", 2)
    assert set(bank.phrasings("angry", 1)).isdisjoint({"A furious person is talking."})
    assert "A furious person is talking." in bank.phrasings("angry", 3)
    picked = bank.sample("sad", 2, random.Random(0), count=5)
    assert len(set(picked)) == 5 and set(picked) <= set(bank.phrasings("sad", 2))


def test_language_model_hook_cleans_lines_and_fills_missing_texts():
    prompts = []

    def fake_llm(prompt: str) -> str:
        prompts.append(prompt)
        return "1. A person beams with delight.\n- \"The portrait just got a puppy.\"\n\n" + "x" * 200

    generator = LanguageModelTextGenerator(fake_llm)
    assert generator("hap", 3, 4) == ["A person beams with delight.", "The portrait just got a puppy."]
    assert "strong happy emotion" in prompts[0]
    metas = describe_clips([_meta("a", "x", "happy"), _meta("b", "x", "sad", texts=["kept"])], generator)
    assert metas[0].texts == ("A person beams with delight.", "The portrait just got a puppy.")
    assert metas[1].texts == ("kept",)
    with pytest.raises(ValueError, match="returned no usable description"):
        LanguageModelTextGenerator(lambda _: "y" * 300)("sad", 1, 2)


# ---- emotion-aware sampling ----------------------------------------------------------------------

def _sampler_clips() -> list[ClipMeta]:
    return [
        _meta("a_neu", "a", "neutral"), _meta("a_hap", "a", "happy", neutral_video="a_neu"),
        _meta("a_sad", "a", "sad"),  # no link: found through the identity
        _meta("b_neu1", "b", "neutral"), _meta("b_neu2", "b", "neutral"), _meta("b_ang", "b", "angry"),
        _meta("c_fea", "c", "fear", frames=50), _meta("c_dis", "c", "disgusted", neutral_video="gone"),
    ]


def test_emotion_aware_reference_is_a_neutral_video_of_the_same_identity(caplog):
    metas = _sampler_clips()
    with caplog.at_level(logging.WARNING):
        sampler = EmotionAwarePairSampler(metas, sample_margin=30)
    assert "2 of 5 emotional clips have no neutral video" in caplog.text
    assert sampler.clips_without_neutral == ("c_fea", "c_dis")
    ids = [m.clip_id for m in metas]
    assert [ids[i] for i in sampler.reference_clips(ids.index("a_hap"))] == ["a_neu"]
    assert [ids[i] for i in sampler.reference_clips(ids.index("b_ang"))] == ["b_neu1", "b_neu2"]
    rng = random.Random(0)
    fallbacks = 0
    seen_b = set()
    for _ in range(400):
        for i, meta in enumerate(metas):
            draw = sampler.draw(i, rng)
            ref = metas[draw.reference_clip]
            assert ref.identity == meta.identity  # never another person
            assert 0 <= draw.reference_frame < ref.num_frames and 0 <= draw.target_frame < meta.num_frames
            if meta.identity == "c" or meta.is_neutral:
                assert draw.reference_clip == i
                if max(draw.reference_frame, meta.num_frames - 1 - draw.reference_frame) >= 30:
                    assert abs(draw.reference_frame - draw.target_frame) >= 30  # margin when possible
            else:
                assert ref.is_neutral and draw.reference_clip != i and not draw.fallback
            fallbacks += draw.fallback
            if meta.clip_id == "b_ang":
                seen_b.add(ref.clip_id)
    assert fallbacks == 2 * 400  # c_fea and c_dis on every draw, nothing else
    assert seen_b == {"b_neu1", "b_neu2"}

    plain = EmotionAwarePairSampler(metas, emotion_aware=False)
    assert all(plain.draw(i, rng).reference_clip == i and not plain.draw(i, rng).fallback
               for i in range(len(metas)))


def test_neutral_links_to_another_identity_or_emotion_are_rejected():
    with pytest.raises(ValueError, match="must show the same person"):
        EmotionAwarePairSampler([_meta("a_neu", "a", "neutral"), _meta("b_hap", "b", "happy", neutral_video="a_neu")])
    with pytest.raises(ValueError, match="whose emotion is 'sad', not neutral"):
        EmotionAwarePairSampler([_meta("a_sad", "a", "sad"), _meta("a_hap", "a", "happy", neutral_video="a_sad")])


# ---- datasets ------------------------------------------------------------------------------------

def test_stage1_dataset_items(clips):
    dataset = Stage1Dataset(clips, size=SIZE, sample_margin=4, seed=0)
    by_id = {c.meta.clip_id: c.meta for c in clips}
    assert len(dataset) == 8 and dataset.sampler.clips_without_neutral == ("id2_disgusted_1", "id2_fear_3")
    for index in range(len(dataset)):
        item = dataset[index]
        target, ref = by_id[item["clip_id"]], by_id[item["reference_clip_id"]]
        assert item["target"].shape == item["reference"].shape == item["face_region"].shape == (3, SIZE, SIZE)
        assert -1.0 <= float(item["target"].min()) and float(item["target"].max()) <= 1.0
        assert set(item["face_region"].unique().tolist()) <= {0.0, 1.0} and item["face_region"].max() == 1.0
        assert item["identity"].shape == (512,) and item["text"] in target.texts
        assert ref.identity == target.identity
        assert item["fallback"] == (target.identity == "id2")
        assert ref.is_neutral or item["reference_clip_id"] == item["clip_id"]
    batch = default_collate([dataset[0], dataset[1]])
    assert batch["target"].shape == (2, 3, SIZE, SIZE) and batch["fallback"].dtype == torch.bool


def test_stage2_dataset_windows_follow_the_clip(clips, caplog):
    frames, motion, margin = 4, 2, 2
    with caplog.at_level(logging.WARNING):
        dataset = Stage2Dataset(clips, size=SIZE, frames=frames, motion_frames=motion, audio_margin=margin, seed=1)
    assert len(dataset) == 8
    item = dataset[3]
    clip = dataset.clips[3]
    start = item["start"]
    assert 2 <= start <= 16 - frames - margin
    paths = clip.frame_paths()
    assert torch.equal(item["frames"], torch.stack([load_frame(paths[start + f], SIZE) for f in range(frames)]))
    assert torch.equal(item["motion"], torch.stack([load_frame(paths[start - 2], SIZE),
                                                    load_frame(paths[start - 1], SIZE)]))
    features = load_tensor_file(clip.audio_emb)
    assert item["audio"].shape == (frames, 5, 2, 8)
    for f in range(frames):
        assert torch.equal(item["audio"][f], features[start + f - 2:start + f + 3])
    assert [m.shape[0] for m in item["masks"]["lip"]] == [64, 16, 4, 1]
    pose, face, lip = (item["masks"][k][0] for k in ("pose", "face", "lip"))
    assert 0.0 <= float(lip.min()) and float(lip.max()) <= 1.0 and float(lip.max()) > 0.5
    assert float(pose[0]) > 0.9 and float(face.max()) > 0.5  # corner is background; the face is marked
    assert item["text"] in clip.meta.texts

    with caplog.at_level(logging.WARNING):
        short = Stage2Dataset(clips, size=SIZE, frames=12, motion_frames=2, audio_margin=2)
    assert len(short) == 8  # 16 frames: start in [2, 2]
    with pytest.raises(ValueError, match="no clip is long enough"):
        Stage2Dataset(clips, size=SIZE, frames=13, motion_frames=2, audio_margin=2)
    assert "left out 8 clip(s) shorter than 13 frames" in caplog.text


# ---- loss ----------------------------------------------------------------------------------------

def _hand_alphas_cumprod() -> np.ndarray:
    """docs/model.md §5.6 with "scaled_linear" betas: zero-terminal-SNR rescale of sqrt(alpha_bar)."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    s = np.sqrt(np.cumprod(1.0 - betas))
    s = (s - s[-1]) * s[0] / (s[0] - s[-1])
    return s ** 2


def test_snr_weighting_is_per_sample_against_a_hand_computation():
    scheduler = make_training_scheduler()
    alpha_bar = _hand_alphas_cumprod()
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), alpha_bar, rtol=2e-4, atol=1e-7)
    assert float(scheduler.alphas_cumprod[499]) == pytest.approx(0.24235900, abs=1e-6)  # docs/model.md §5.6 test vector

    t = torch.tensor([0, 300, 700, 999])
    hand_snr = alpha_bar[[0, 300, 700, 999]] / (1 - alpha_bar[[0, 300, 700, 999]])
    hand_w = np.minimum(hand_snr + 1, 5.0) / (hand_snr + 1)
    np.testing.assert_allclose(snr(scheduler, t).numpy(), hand_snr, rtol=5e-4)
    np.testing.assert_allclose(min_snr_weights(snr(scheduler, t), 5.0).numpy(), hand_w, rtol=5e-4)
    assert hand_w[-1] == 1.0 and hand_w[0] < 0.01  # zero-SNR end: weight 1; clean end: tiny

    torch.manual_seed(0)
    x0, noise = torch.randn(4, 4, 2, 8, 8), torch.randn(4, 4, 2, 8, 8)
    targets = diffusion_targets(scheduler, x0, noise, t, snr_gamma=5.0)
    a = torch.tensor(alpha_bar[[0, 300, 700, 999]], dtype=torch.float32)[:, None, None, None, None]
    torch.testing.assert_close(targets.target, a.sqrt() * noise - (1 - a).sqrt() * x0, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(targets.noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-3, atol=1e-4)

    errors = torch.tensor([0.5, 1.0, 2.0, 3.0])  # per-sample constant offsets: MSE = error^2
    prediction = targets.target + errors[:, None, None, None, None]
    loss, per_sample = weighted_loss(prediction, targets)
    expected = errors.double() ** 2 * torch.tensor(hand_w)
    torch.testing.assert_close(per_sample.double(), expected, rtol=5e-4, atol=1e-6)
    assert float(loss) == pytest.approx(float(expected.mean()), rel=5e-4)
    batch_mean_bug = float((errors.double() ** 2).mean() * torch.tensor(hand_w).mean())
    assert abs(float(loss) - batch_mean_bug) > 0.5  # not the official stage-2 weighting

    with pytest.raises(ValueError, match="v-prediction"):
        diffusion_targets(make_scheduler(prediction_type="epsilon"), x0, noise, t, 5.0)


def test_noise_offset_shifts_each_sample_channel_by_one_constant():
    g = torch.Generator().manual_seed(0)
    plain = offset_noise((256, 4, 2, 16, 16), 0.0, g)
    shifted = offset_noise((256, 4, 2, 16, 16), 0.5, g)
    assert float(plain.mean(dim=(2, 3, 4)).std()) < 0.05
    assert 0.4 < float(shifted.mean(dim=(2, 3, 4)).std()) < 0.6  # offset * N(0, 1) per (sample, channel)
    centred = shifted - shifted.mean(dim=(2, 3, 4), keepdim=True)
    assert 0.95 < float(centred.std()) < 1.05


# ---- dropouts ------------------------------------------------------------------------------------

def test_dropout_rates_are_the_configured_probabilities():
    g = torch.Generator().manual_seed(0)
    n = 40000
    stage1 = draw_stage1_dropouts(n, Stage1Settings(uncond_ratio=0.1), g).uncond
    assert abs(stage1.float().mean().item() - 0.1) < 0.006
    d = draw_stage2_dropouts(n, Stage2Settings(0.05, 0.05, 0.05), g)
    for mask in (d.image, d.audio, d.start):
        assert abs(mask.float().mean().item() - 0.05) < 0.004
    assert abs((d.image & d.audio).float().mean().item() - 0.0025) < 0.0012  # independent draws
    assert not draw_stage1_dropouts(100, Stage1Settings(uncond_ratio=0.0), g).uncond.any()
    assert draw_stage2_dropouts(100, Stage2Settings(1.0, 0.0, 1.0), g).image.all()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        draw_stage1_dropouts(3, Stage1Settings(uncond_ratio=1.5), g)


def test_reference_pairing_is_per_sample():
    assert ReferencePairing.for_samples([True] * 3, 4, 2) == ReferencePairing.per_sample(3, 4, 2)
    assert ReferencePairing.per_sample(3, 4, 2).reference_rows == (0,) * 4 + (3,) * 4 + (6,) * 4
    pairing = ReferencePairing.for_samples([False, True, True], frames=2, motion_frames=0, bank_samples=[1, 2])
    assert pairing.reference_rows == (-1, -1, 0, 0, 1, 1)
    pairing = ReferencePairing.for_samples([False, True], frames=2, motion_frames=2)
    assert pairing.reference_rows == (-1, -1, 3, 3) and pairing.motion_rows == ((1, 2), (4, 5))
    with pytest.raises(ValueError, match="every sample needs its group"):
        ReferencePairing.for_samples([False, True], frames=1, motion_frames=2, bank_samples=[1])
    with pytest.raises(ValueError, match="sample 1 should attend to its reference but is not in the bank"):
        ReferencePairing.for_samples([False, True], frames=1, motion_frames=0, bank_samples=[0])


class _Capture:
    """Records the inputs of a module's forward."""

    def __init__(self, module: torch.nn.Module):
        self.calls = []
        module.register_forward_pre_hook(lambda _m, args, kwargs: self.calls.append((args, kwargs)),
                                         with_kwargs=True)


def _stage1_batch(clips, n=2):
    dataset = Stage1Dataset(clips, size=SIZE, sample_margin=4, seed=0)
    return default_collate([dataset[i] for i in range(n)])


def test_stage1_uncond_sample_gets_zero_identity_empty_text_and_no_reference(helpers, clips):
    models = _models(helpers, stage1_net_config(NetConfig.tiny()))
    batch = _stage1_batch(clips)
    unet, ref_net = _Capture(models.net.denoising_unet), _Capture(models.net.reference_unet)
    result = stage1_step(models, batch, Stage1Settings(), torch.Generator().manual_seed(0),
                         dropouts=Dropouts(uncond=torch.tensor([True, False])))
    (sample, t, context, audio_inputs), kwargs = unet.calls[0]
    assert sample.shape == (2, 4, 1, 8, 8) and torch.equal(t, result.timesteps)
    with torch.no_grad():
        text = models.encode_text(batch["text"])
        face = models.net.imageproj(torch.stack([torch.zeros(512), batch["identity"][1]]))
    torch.testing.assert_close(context[0, :77], models.uncond_text()[0])
    torch.testing.assert_close(context[1, :77], text[1])
    torch.testing.assert_close(context[:, 77:], face)
    assert kwargs["reference"].pairing.reference_rows == (-1, 0)
    (ref_latents, ref_context, _), _ = ref_net.calls[0]
    assert ref_latents.shape == (1, 4, 8, 8)  # only the conditional sample runs through the ReferenceNet
    torch.testing.assert_close(ref_context, context[1:])
    assert result.loss.ndim == 0 and torch.isfinite(result.loss)

    all_uncond = stage1_step(models, batch, Stage1Settings(), None, Dropouts(uncond=torch.tensor([True, True])))
    assert unet.calls[-1][1]["reference"] is None and len(ref_net.calls) == 1
    assert torch.isfinite(all_uncond.loss)


def test_stage2_dropouts_reach_reference_audio_and_motion_frames(helpers, clips):
    models = _models(helpers, NetConfig.tiny())
    configure_trainable(models.net, 2)
    frames = 2
    dataset = Stage2Dataset(clips, size=SIZE, frames=frames, motion_frames=2, audio_margin=2, seed=0)
    batch = default_collate([dataset[0], dataset[5]])
    vae_in, unet = _Capture(models.vae.encoder), _Capture(models.net.denoising_unet)
    drops = Dropouts(image=torch.tensor([True, False]), audio=torch.tensor([False, True]),
                     start=torch.tensor([True, False]))
    result = stage2_step(models, batch, Stage2Settings(), torch.Generator().manual_seed(0), drops)
    ref_images = vae_in.calls[1][0][0]  # second VAE call: per sample [reference, motion 1, motion 2]
    assert ref_images.shape == (6, 3, SIZE, SIZE)
    assert torch.equal(ref_images[1:3], torch.zeros(2, 3, SIZE, SIZE))  # start: mid-grey motion frames
    torch.testing.assert_close(ref_images[4:6], batch["motion"][1])
    torch.testing.assert_close(ref_images[0], batch["reference"][0])
    (sample, _, context, audio_inputs), kwargs = unet.calls[0]
    assert sample.shape == (2, 4, frames, 8, 8)
    reader = kwargs["reference"]
    assert reader.pairing.reference_rows == (-1, -1, 3, 3)
    assert reader.pairing.motion_rows == ((1, 2), (4, 5))  # each sample's own motion frames
    assert audio_inputs.audio.shape == (2, frames, 4, 768)
    assert not audio_inputs.audio[1].any() and audio_inputs.audio[0].abs().sum() > 0
    assert audio_inputs.emotion.shape == (2 * frames, 77, 768)
    torch.testing.assert_close(audio_inputs.emotion[0], context[0, :77])
    torch.testing.assert_close(audio_inputs.emotion[3], context[1, :77])
    assert [m.shape for m in audio_inputs.masks[2]] == [(4, 64), (4, 16), (4, 4), (4, 1)]
    result.loss.backward()
    assert models.net.audioproj.proj1.weight.grad is not None
    assert models.net.reference_unet.conv_in.weight.grad is None


# ---- trainable parameters ------------------------------------------------------------------------

def test_trainable_parameters_per_stage_are_exact():
    net1 = build_net(stage1_net_config(NetConfig.tiny()), device="meta")
    names1 = set(trainable_parameter_names(net1, 1))
    all1 = {n for n, _ in net1.named_parameters()}
    assert names1 == {n for n in all1 if not n.startswith("audioproj.")}
    assert "denoising_unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.0.weight" in names1
    assert "reference_unet.conv_in.weight" in names1 and "face_locator.conv_out.weight" in names1
    assert "imageproj.proj.weight" in names1

    net = build_net(NetConfig.tiny(), device="meta")
    everything = {n for n, _ in net.named_parameters()}
    frame = {n for n in everything if ".audio_modules." in n or ".motion_modules." in n}
    audioproj = {n for n in everything if n.startswith("audioproj.")}
    assert frame and audioproj
    names2 = set(trainable_parameter_names(net, 2))
    assert names2 == frame | audioproj
    assert names2.isdisjoint({n for n in everything if "to_k_ip" in n or n.startswith("reference_unet.")})
    # the full network in stage 1: everything spatial, no frame module, no audio projection
    assert set(trainable_parameter_names(net, 1)) == everything - frame - audioproj

    trainable = configure_trainable(net, 2)
    assert len(trainable) == len(names2)
    assert {n for n, p in net.named_parameters() if p.requires_grad} == names2
    with pytest.raises(ValueError, match="stage must be one of"):
        trainable_parameter_names(net, 3)
    with pytest.raises(ValueError, match="this network has none"):
        configure_trainable(net1, 2)


# ---- optimisation --------------------------------------------------------------------------------

def test_stage1_overfits_one_repeated_batch(helpers, clips):
    models = _models(helpers, stage1_net_config(NetConfig.tiny()))
    params = configure_trainable(models.net, 1)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    batch = _stage1_batch(clips)
    settings = Stage1Settings(uncond_ratio=0.0)
    losses = []
    for _ in range(25):
        # the same timesteps, noise and VAE samples every step: only the weights change
        result = stage1_step(models, batch, settings, torch.Generator().manual_seed(3))
        optimizer.zero_grad()
        result.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(float(result.loss.detach()))
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.3 * losses[0], losses


def test_gradient_checkpointing_keeps_outputs_and_gradients():
    torch.manual_seed(0)
    net = build_net(NetConfig.tiny(), zero_init=False)
    unet = net.denoising_unet
    b, f, lat = 1, 2, 8
    sample = torch.randn(b, 4, f, lat, lat)
    context = torch.randn(b, 81, 768)
    masks = [[torch.rand(1, (lat >> i) ** 2) for i in range(4)] for _ in range(3)]
    cond = AudioAttentionInputs(torch.randn(b, f, 4, 768), torch.randn(b * f, 77, 768), masks)
    bank = net.reference_unet(torch.randn(3, 4, lat, lat), context.repeat(3, 1, 1), 0)
    reader = ReferenceReader(bank, ReferencePairing.per_sample(b, f, 2))

    def run(checkpointing: bool):
        unet.gradient_checkpointing = checkpointing
        unet.zero_grad()
        out = unet(sample, torch.tensor([500]), context, cond, torch.randn(b, 32, lat, lat,
                   generator=torch.Generator().manual_seed(1)), reader)
        out.square().mean().backward(retain_graph=True)
        return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}

    plain_out, plain_grads = run(False)
    ckpt_out, ckpt_grads = run(True)
    unet.gradient_checkpointing = False
    torch.testing.assert_close(ckpt_out, plain_out, rtol=0, atol=0)
    assert plain_grads.keys() == ckpt_grads.keys() and len(plain_grads) > 100
    for name in plain_grads:
        torch.testing.assert_close(ckpt_grads[name], plain_grads[name], rtol=1e-5, atol=1e-7)


# ---- configs, runner and checkpoints -------------------------------------------------------------

def test_stage_configs_carry_the_official_values():
    s1 = load_stage_config(ROOT / "training/configs/stage1.yaml")
    s2 = load_stage_config(ROOT / "training/configs/stage2.yaml")
    assert (s1.stage, s1.data.batch_size, s1.data.size, s1.data.sample_margin) == (1, 2, 512, 30)
    assert (s1.solver.max_train_steps, s1.solver.learning_rate, s1.solver.use_8bit_adam) == (30000, 1e-5, False)
    assert (s1.dropout.uncond, s1.diffusion.noise_offset, s1.diffusion.snr_gamma) == (0.1, 0.05, 5.0)
    assert not s1.solver.gradient_checkpointing and s1.data.emotion_aware
    assert (s2.stage, s2.data.frames, s2.data.motion_frames, s2.data.audio_margin) == (2, 14, 2, 2)
    assert (s2.solver.max_train_steps, s2.solver.use_8bit_adam, s2.solver.gradient_checkpointing) == (40000, True, True)
    assert (s2.dropout.image, s2.dropout.audio, s2.dropout.start) == (0.05, 0.05, 0.05)
    assert s2.output.checkpointing_steps == 20000 and s1.output.checkpointing_steps == 500
    assert (s1.solver.adam_weight_decay, s1.solver.adam_epsilon, s1.solver.max_grad_norm) == (1e-2, 1e-8, 1.0)


def test_config_errors_are_specific(tmp_path):
    base = {"stage": 1, "data": {"roots": ["x"]}}
    assert config_from_dict(apply_overrides(base, ["solver.learning_rate=1e-4", "data.batch_size=4"])) \
        .solver.learning_rate == 1e-4
    with pytest.raises(ValueError, match=r"solver: unknown key\(s\) \['lr'\]"):
        config_from_dict({**base, "solver": {"lr": 1}})
    with pytest.raises(ValueError, match="data: batch_size must be an integer, got 'two'"):
        config_from_dict(apply_overrides(base, ["data.batch_size=two"]))
    with pytest.raises(ValueError, match="data.roots is empty"):
        config_from_dict({"stage": 1})
    with pytest.raises(ValueError, match="dropout.image must be a probability"):
        config_from_dict({**base, "dropout": {"image": 2}})
    with pytest.raises(ValueError, match="must look like section.key=value"):
        apply_overrides(base, ["novalue"])
    (tmp_path / "c.yaml").write_text("stage: 2\ndata: {roots: [x]}\n")
    assert training_cli(["stage1", "--config", str(tmp_path / "c.yaml")]) == 1


def test_two_stage_run_writes_checkpoints_the_inference_loader_accepts(helpers, dataset_root, tmp_path, capsys):
    out = tmp_path / "run"
    (out / "models").mkdir(parents=True)
    for name in ("vae", "clip"):
        (out / "models" / name).symlink_to(helpers / name, target_is_directory=True)
    (out / "data").symlink_to(dataset_root, target_is_directory=True)
    first = train(smoke_config(1, out, steps=2, size=SIZE, frames=2))
    second = train(smoke_config(2, out, steps=2, size=SIZE, frames=2))

    log = [json.loads(line) for line in (out / "stage1" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert log[-1]["fallbacks"] == first.reference_fallbacks

    # stage 1: its own layout (no motion / audio modules), config in the metadata; .pth with the same tensors
    s1 = ck.load_net(first.checkpoint)
    assert not s1.config.use_motion_module and not any(".motion_modules." in k for k in s1.state_dict())
    pth = ck.load_state_dict(first.checkpoint.with_suffix(".pth"))
    assert pth.keys() == s1.state_dict().keys()

    # stage 2: exactly the tiny inference layout; spatial weights are stage 1's, untouched by stage 2
    assert second.checkpoint.name == "net-2.safetensors"
    ck.check_layout(second.checkpoint, ck.read_layout(second.checkpoint), NetConfig.tiny())
    s2 = ck.load_net(second.checkpoint)
    assert s2.config == NetConfig.tiny()
    assert emocast_cli(["inspect", str(second.checkpoint), "--tiny"]) == 0
    assert "layout matches the tiny test config" in capsys.readouterr().out
    s1_state, s2_state = s1.state_dict(), s2.state_dict()
    for key in ("reference_unet.conv_in.weight", "imageproj.proj.weight", "face_locator.conv_out.weight",
                "denoising_unet.up_blocks.3.attentions.0.transformer_blocks.0.attn2.processor.to_k_ip.0.weight"):
        assert torch.equal(s2_state[key], s1_state[key]), key
    moved = [k for k in s2_state if ".motion_modules." in k and k.endswith("proj_out.weight")]
    assert any(s2_state[k].abs().sum() > 0 for k in moved)  # zero-initialised, now trained
    assert ck.load_net(second.checkpoint.with_suffix(".pth"), NetConfig.tiny()).config == NetConfig.tiny()

    # stage-1 weights load into a stage-2 network; a file missing a stage-1 module is refused
    other, stage1_net = build_net(NetConfig.tiny()), build_net(stage1_net_config(NetConfig.tiny()))
    save_checkpoint(stage1_net, tmp_path / "s1", 0, 1, save_pth=False)
    assert load_stage1_weights(other, tmp_path / "s1" / "net-0.safetensors") == \
        sum(not k.startswith("audioproj.") for k in stage1_net.state_dict())
    assert torch.equal(other.reference_unet.conv_in.weight, stage1_net.reference_unet.conv_in.weight)
    broken = {k: v for k, v in ck.load_state_dict(tmp_path / "s1" / "net-0.safetensors").items()
              if not k.startswith("face_locator.")}
    ck.save_safetensors(broken, tmp_path / "broken.safetensors")
    message = r"not a stage-1 checkpoint(.|\n)*missing 16 keys(.|\n)*face_locator.conv_out"
    with pytest.raises(ck.CheckpointError, match=message):
        load_stage1_weights(other, tmp_path / "broken.safetensors")


def test_progressive_phases_continue_from_the_previous_checkpoint(helpers, dataset_root, tmp_path):
    base = tmp_path / "stage2.yaml"
    base.write_text(yaml.safe_dump({
        "stage": 2, "device": "cpu", "seed": 0,
        "model": {"config": "tiny", "vae": str(helpers / "vae"), "clip": str(helpers / "clip")},
        "data": {"roots": [str(dataset_root)], "batch_size": 2, "size": SIZE, "num_workers": 0, "frames": 2},
        "output": {"dir": "unused", "save_pth": False},
    }))
    path = tmp_path / "progressive.yaml"
    path.write_text(yaml.safe_dump({"base": str(base), "output_dir": str(tmp_path / "prog"), "phases": [
        {"name": "wide", "max_train_steps": 1},
        {"name": "narrow", "max_train_steps": 1, "sources": ["Synthetic"]}]}))
    config = load_progressive_config(path)
    first, second = phase_configs(config)
    assert first.output.dir == str(tmp_path / "prog" / "1-wide") and first.data.sources == []
    assert second.data.sources == ["Synthetic"] and second.solver.max_train_steps == 1
    assert len(select_clips(second)) == 8
    message = r"no clip .* has a source in \['HDTF'\] \(the clips' sources are \['synthetic'\]\)"
    with pytest.raises(ValueError, match=message):
        select_clips(phase_configs(config, ["data.sources=[HDTF]"])[0])

    results = run_progressive(config)
    assert results[1].checkpoint == tmp_path / "prog" / "2-narrow" / "net-1.safetensors"
    recorded = yaml.safe_load((tmp_path / "prog" / "2-narrow" / "train_config.yaml").read_text())
    assert recorded["model"]["init_checkpoint"] == str(results[0].checkpoint)
    ck.check_layout(results[1].checkpoint, ck.read_layout(results[1].checkpoint), NetConfig.tiny())
    assert all(len(r.losses) == 1 and r.start_step == 0 for r in results)

    # the same command again: both phases are finished and skipped; a longer last phase resumes
    again = run_progressive(config)
    assert [(r.checkpoint, r.steps, r.losses) for r in again] == [(r.checkpoint, 1, []) for r in results]
    path.write_text(yaml.safe_dump({"base": str(base), "output_dir": str(tmp_path / "prog"), "phases": [
        {"name": "wide", "max_train_steps": 1},
        {"name": "narrow", "max_train_steps": 2, "sources": ["Synthetic"]}]}))
    longer = run_progressive(load_progressive_config(path))
    assert longer[0].losses == [] and (longer[1].start_step, longer[1].steps, len(longer[1].losses)) == (1, 2, 1)
    assert longer[1].checkpoint == tmp_path / "prog" / "2-narrow" / "net-2.safetensors"

    path.write_text(yaml.safe_dump({"base": str(base), "output_dir": "x", "phases": [
        {"name": "a b", "max_train_steps": 1}]}))
    with pytest.raises(ValueError, match="phase name 'a b' must be"):
        load_progressive_config(path)


# ---- data preparation ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def preparer(tmp_path_factory):
    from emocast_core.preprocess.audio_features import Wav2Vec2AudioEncoder
    from emocast_core.preprocess.face import FaceAnalyzer
    from emocast_core.testing.face_models import write_face_models
    from emocast_core.testing.tiny_models import write_wav2vec2

    folder = tmp_path_factory.mktemp("prep_models")
    return Preparer(FaceAnalyzer.from_folder(write_face_models(folder / "face_analysis")),
                    Wav2Vec2AudioEncoder.from_pretrained(write_wav2vec2(folder / "wav2vec2")))


def _talking_video(path: Path, frames: int = 40, fps: int = 30, blank: bool = False) -> Path:
    from emocast_core.preprocess.audio import AudioClip
    from emocast_core.video import write_video

    rng = np.random.default_rng(0)
    images = np.full((frames, 128, 128, 3), 90, np.uint8)
    if not blank:
        for i, image in enumerate(images):
            image[:] = rng.integers(0, 60, (128, 128, 3))
            cv2.ellipse(image, (64, 58), (24, 30), 0, 0, 360, (200, 160, 140), -1)
            cv2.ellipse(image, (64, 76), (8, 2 + i % 5), 0, 0, 360, (90, 20, 30), -1)
    t = torch.arange(int(16000 * frames / fps)) / 16000
    speech = 0.3 * torch.sin(2 * torch.pi * 220 * t) * (1 + torch.sin(2 * torch.pi * 3 * t)) / 2
    return write_video(path, images, fps=fps, audio=AudioClip(speech[None], 16000))


def test_resample_indices_and_mead_labels():
    assert resample_indices(40, 30.0)[:8].tolist() == [0, 1, 2, 3, 4, 6, 7, 8] and len(resample_indices(40, 30.0)) == 33
    assert resample_indices(10, 25.0).tolist() == list(range(10))
    assert resample_indices(10, 50.0).tolist() == [0, 2, 4, 6, 8]
    with pytest.raises(ValueError, match="unusable frame rate"):
        resample_indices(10, float("nan"))
    label = parse_mead_path("/data/MEAD/M003/video/front/angry/level_3/001.mp4")
    assert label == ClipLabel("M003_angry_3_001", "M003", "angry", 3, "MEAD")
    assert parse_mead_path("W009/video/left_30/con/level_1/012.mp4").clip_id == "W009_contempt_1_012_left_30"
    with pytest.raises(ValueError, match="does not follow MEAD's layout"):
        parse_mead_path("videos/clip.mp4")


def test_prepare_writes_a_clip_the_datasets_read(preparer, tmp_path):
    video = _talking_video(tmp_path / "talk.mp4")
    root = tmp_path / "prepared"
    clip = preparer.prepare(video, root, ClipLabel("w1_happy", "w1", "happy", 2, "test"))
    meta = clip.meta
    assert (meta.num_frames, meta.fps, meta.emotion, meta.intensity, meta.source) == (33, 25, "happy", 2, "test")
    assert len(meta.texts) == 4 and set(meta.texts) <= set(EmotiveTextBank().phrasings("happy", 2))
    assert len(clip.frame_paths()) == 33 and sorted(p.name for p in root.iterdir()) == ["w1_happy"]
    features = load_tensor_file(clip.audio_emb)
    assert features.shape[1:] == (2, 8) and abs(features.shape[0] - 33) <= 1
    identity = load_tensor_file(clip.face_emb)
    assert identity.shape == (512,) and float(identity.abs().sum()) > 0
    box = cv2.imread(str(clip.face_mask), cv2.IMREAD_GRAYSCALE)
    assert box.shape == (128, 128) and set(np.unique(box).tolist()) == {0, 255}
    assert box[int(0.45 * 128), 64] == 255 and box[2, 2] == 0  # the synthetic detector's face, not the corner
    for path in clip.region_masks:
        assert cv2.imread(str(path), cv2.IMREAD_GRAYSCALE).shape == (64, 64)
    item = Stage2Dataset([clip], size=SIZE, frames=4)[0]
    assert item["frames"].shape == (4, 3, SIZE, SIZE) and item["audio"].shape == (4, 5, 2, 8)
    with pytest.raises(FileExistsError, match="already prepared"):
        preparer.prepare(video, root, ClipLabel("w1_happy", "w1", "happy"))

    # hooks: an emotion classifier for unlabelled videos, a lip-sync filter
    preparer.emotion_classifier = lambda frames: ("sad", 3)
    assert preparer.prepare(video, root, ClipLabel("w1_x", "w1")).meta.emotion == "sad"
    strict = dataclasses.replace(preparer, sync_scorer=lambda frames, wave: (1.5, 9.0),
                                 settings=PrepareSettings(min_sync_confidence=3.0))
    assert strict.prepare(video, root, ClipLabel("w1_y", "w1", "happy")) is None
    with pytest.raises(ValueError, match="no face in frame 0"):
        preparer.prepare(_talking_video(tmp_path / "blank.mp4", blank=True), root, ClipLabel("w1_z", "w1", "sad"))
    assert sorted(p.name for p in root.iterdir()) == ["w1_happy", "w1_x"]  # nothing partial left behind


def test_prepare_all_resumes_and_skips_bad_videos(preparer, tmp_path):
    from training.data.prepare import prepare_all

    good = _talking_video(tmp_path / "good.mp4")
    corrupt = tmp_path / "corrupt.mp4"
    corrupt.write_bytes(b"not a video at all")
    blank = _talking_video(tmp_path / "blank.mp4", blank=True)
    root = tmp_path / "prepared"
    jobs = [(corrupt, ClipLabel("c", "w1", "sad")), (good, ClipLabel("g", "w1", "happy")),
            (blank, ClipLabel("b", "w1", "angry"))]
    report = prepare_all(preparer, jobs, root)
    assert [c.meta.clip_id for c in report.prepared] == ["g"]
    assert [v.name for v, _ in report.failed] == ["corrupt.mp4", "blank.mp4"]
    assert "no face in frame 0" in report.failed[1][1] and "corrupt.mp4" in report.summary()
    again = prepare_all(preparer, jobs, root)  # a rerun keeps what is done and retries only the failures
    assert again.already == 1 and again.prepared == [] and len(again.failed) == 2
    assert sorted(p.name for p in root.iterdir()) == ["g"]


def test_link_neutral_videos_rewrites_the_emotional_clips(tmp_path):
    for meta in (_meta("a_hap", "a", "happy"), _meta("a_neu2", "a", "neutral"), _meta("a_neu1", "a", "neutral"),
                 _meta("b_sad", "b", "sad"), _meta("a_ang", "a", "angry", neutral_video="a_neu2")):
        save_clip_meta(meta, tmp_path / meta.clip_id)
    assert link_neutral_videos(discover_clips([tmp_path])) == 1
    links = {c.meta.clip_id: c.meta.neutral_video for c in discover_clips([tmp_path])}
    assert links == {"a_ang": "a_neu2", "a_hap": "a_neu1", "a_neu1": None, "a_neu2": None, "b_sad": None}


# ---- the smoke chain: videos -> preparation -> stage 1 -> stage 2 -> progressive -> generation ------

def test_smoke_chain_from_videos_trains_a_net_the_pipeline_generates_with(tmp_path, capsys):
    from skimage import data as skdata

    from emocast_core.model_paths import ModelPaths
    from emocast_core.pipeline import GenerationRequest, generate
    from emocast_core.runtime import EmoCASTModels
    from emocast_core.preprocess.audio import AudioClip
    from emocast_core.sampling_settings import SamplingSettings
    from emocast_core.testing.speech import synthesize_speech
    from emocast_core.video import read_video
    from training.smoke import SMOKE_PHASES, VIDEO_SOURCES, run_smoke

    out = tmp_path / "smoke"
    result = run_smoke(out, steps=1, size=SIZE, frames=2, phase_steps=1)

    # the videos: rendered faces with a speech track; every one prepared (the synthetic detector found a face)
    frames, fps, audio = read_video(out / "videos" / "id0_happy_3.mp4")
    assert frames.shape == (24, SIZE, SIZE, 3) and fps == pytest.approx(25) and audio is not None
    assert float(audio.waveform.abs().max()) > 0.1
    prepared = discover_clips([out / "data"])
    assert len(prepared) == 8 and {c.meta.source for c in prepared} == set(VIDEO_SOURCES.values())
    for clip in prepared:
        box = cv2.imread(str(clip.face_mask), cv2.IMREAD_GRAYSCALE)
        assert box[SIZE // 2, SIZE // 2] == 255 and box[0, 0] == 0
        assert abs(load_tensor_file(clip.audio_emb).shape[0] - clip.meta.num_frames) <= 1
    links = {c.meta.clip_id: c.meta.neutral_video for c in prepared}
    assert links["id0_happy_3"] == "id0_neutral_1" and links["id2_fear_3"] is None

    # stage 1 -> stage 2 -> three phases, each continuing from the previous checkpoint, on its sources
    previous = result.stage2_checkpoint
    for (name, sources), checkpoint in zip(SMOKE_PHASES, result.phase_checkpoints, strict=True):
        recorded = yaml.safe_load((checkpoint.parent / "train_config.yaml").read_text())
        assert recorded["model"]["init_checkpoint"] == str(previous) and recorded["data"]["sources"] == list(sources)
        assert checkpoint.parent.name.endswith(name) and checkpoint.name == "net-1.safetensors"
        previous = checkpoint
    final = out / "models" / "emocast.safetensors"
    assert final.read_bytes() == result.final_checkpoint.read_bytes()
    assert emocast_cli(["inspect", str(final), "--tiny"]) == 0
    assert "layout matches the tiny test config" in capsys.readouterr().out
    trained, stage1, stage2 = (ck.load_state_dict(p) for p in (final, result.stage1_checkpoint,
                                                               result.stage2_checkpoint))
    assert torch.equal(trained["imageproj.proj.weight"], stage1["imageproj.proj.weight"])  # stage 1's, kept
    assert any(not torch.equal(trained[k], stage2[k]) for k in trained if ".motion_modules." in k)  # phases trained

    # the trained net generates: a real photo, synthesised speech, 1 step, clip length 8, 128 px
    models = EmoCASTModels.load(ModelPaths.resolve(out / "models"), device="cpu", dtype="fp32")
    speech = synthesize_speech("Hello there.")
    request = GenerationRequest(image=skdata.astronaut(), audio=AudioClip(torch.from_numpy(speech)[None], 16000),
                                size=128, sampling=SamplingSettings(steps=1, clip_length=8))
    video = generate(models, request)
    expected = int(np.ceil(len(speech) / 16000 * 25))
    assert video.frames.shape[0] == expected and video.frames.shape[-2:] == (128, 128)
    assert torch.isfinite(video.frames).all() and float(video.frames.std()) > 0


# ---- resuming and accelerate ----------------------------------------------------------------------

def _run_config(helpers: Path, dataset_root: Path, out: Path, stage: int, steps: int, **solver):
    return config_from_dict({
        "stage": stage, "device": "cpu", "seed": 0,
        "model": {"config": "tiny", "vae": str(helpers / "vae"), "clip": str(helpers / "clip")},
        "data": {"roots": [str(dataset_root)], "batch_size": 2, "size": SIZE, "num_workers": 0, "frames": 2,
                 "sample_margin": 4},
        "solver": {"max_train_steps": steps, "learning_rate": 1e-3, **solver},
        "output": {"dir": str(out), "checkpointing_steps": 2, "save_pth": False},
    })


def test_an_interrupted_stage_resumes_where_it_stopped_and_ends_like_an_uninterrupted_run(
        helpers, dataset_root, tmp_path, monkeypatch):
    import training.runner as runner
    from training.resume import find_resume_point

    plain = train(_run_config(helpers, dataset_root, tmp_path / "plain", 1, 4, gradient_accumulation_steps=2))
    assert plain.steps == 4 and len(plain.losses) == 4

    calls = {"n": 0}
    real_step = runner.stage1_step

    def crash_in_step_3(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # 2 micro-batches per step: the second of step 3
            raise KeyboardInterrupt("killed")
        return real_step(*args, **kwargs)

    out = tmp_path / "interrupted"
    config = _run_config(helpers, dataset_root, out, 1, 4, gradient_accumulation_steps=2)
    monkeypatch.setattr(runner, "stage1_step", crash_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(runner, "stage1_step", real_step)
    assert find_resume_point(out).step == 2 and not (out / "net-3.safetensors").exists()
    with (out / "log.jsonl").open("a") as log:  # as if the killed run had logged a step past its checkpoint
        log.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")

    resumed = train(config)
    assert (resumed.start_step, resumed.steps, len(resumed.losses)) == (2, 4, 2)
    assert resumed.losses == plain.losses[2:]  # the same batches, noise and optimizer state: bit for bit
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["loss"] for r in log] == plain.losses
    assert resumed.reference_fallbacks == plain.reference_fallbacks > 0
    mine, theirs = ck.load_state_dict(resumed.checkpoint), ck.load_state_dict(plain.checkpoint)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert sorted(p.name for p in out.glob("state-*")) == ["state-4.pt", "state-4.rank0.pt"]  # older pruned

    again = train(config)  # finished: nothing runs, nothing is appended
    assert (again.steps, again.losses, again.checkpoint) == (4, [], out / "net-4.safetensors")
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
    fresh = train(dataclasses.replace(config, output=dataclasses.replace(config.output, resume=False)))
    assert fresh.start_step == 0 and fresh.losses == plain.losses


def test_the_loop_runs_under_accelerate_with_accumulation_and_mixed_precision(helpers, dataset_root, tmp_path):
    out = tmp_path / "bf16"
    result = train(_run_config(helpers, dataset_root, out, 2, 1, gradient_accumulation_steps=2,
                               mixed_precision="bf16"))
    assert result.steps == 1 and all(np.isfinite(result.losses))
    # the checkpoint: exactly the tiny inference layout, fp32 weights (autocast only), loadable
    ck.check_layout(result.checkpoint, ck.read_layout(result.checkpoint), NetConfig.tiny())
    state = ck.load_state_dict(result.checkpoint)
    reference = build_net(NetConfig.tiny()).state_dict()
    assert state.keys() == reference.keys()
    assert all(state[k].shape == reference[k].shape and state[k].dtype == torch.float32 for k in state)
    # two micro-batches, one optimizer step (and one schedule step)
    saved = torch.load(out / "state-1.pt", weights_only=True)
    assert {int(s["step"]) for s in saved["optimizer"]["state"].values()} == {1}
    assert saved["lr_schedule"]["last_epoch"] == 1
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train(_run_config(helpers, dataset_root, tmp_path / "fp16", 2, 1, mixed_precision="fp16"))
