"""Single-file VAE / CLIP-L / wav2vec2 checkpoints (ComfyUI's own model folders) in place of the model
folder's sub-folders: the same models, the same outputs, and errors that name the file at fault.

The single files are written by the tests from the tiny folder models, in the layouts ComfyUI keeps: the
original LDM key layout for the VAE, the HF ``text_model.*`` state dict for CLIP-L, the HF ``Wav2Vec2Model``
state dict for wav2vec2.
"""
from __future__ import annotations

import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from comfy_stubs import fake_comfy, node, portrait, speech  # noqa: F401  (fixtures)

from emocast_pack.emocast_core import single_file  # noqa: E402  (the pack is loaded by comfy_stubs)
from emocast_pack.emocast_core.checkpoints import load_state_dict
from emocast_pack.emocast_core.emotion import EmotionTextEncoder
from emocast_pack.emocast_core.model_paths import ModelPaths
from emocast_pack.emocast_core.runtime import EmoCASTModels
from emocast_pack.emocast_core.preprocess.audio_features import Wav2Vec2AudioEncoder
from emocast_pack.emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models


adapter = sys.modules["emocast_pack.nodes.comfy_adapter"]
model_cache = sys.modules["emocast_pack.nodes.model_cache"]
loader_mod = sys.modules["emocast_pack.nodes.loader"]


# ---- the single-file formats, written from the tiny folder models ---------------------------------------
def _ldm_vae_key(key: str, num_up: int) -> str:
    """diffusers AutoencoderKL key -> the original LDM key (the inverse of diffusers' converter)."""
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key)
    key = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
                 lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.block.{m[2]}.", key)
    key = re.sub(r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                 lambda m: f"decoder.up.{num_up - 1 - int(m[1])}.upsample.", key)
    key = re.sub(r"\.mid_block\.resnets\.(\d)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", key)
    key = key.replace(".mid_block.attentions.0.", ".mid.attn_1.").replace(".conv_norm_out.", ".norm_out.")
    key = key.replace("conv_shortcut.", "nin_shortcut.")
    for new, old in (("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."),
                     ("proj_out.", "to_out.0.")):
        key = key.replace(f"attn_1.{old}", f"attn_1.{new}")
    return key


def to_ldm_vae(state: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        ldm = _ldm_vae_key(key, num_up)
        if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", ldm):
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[ldm] = value.contiguous()
    return out


def _tiny_configs(folder: Path) -> dict[str, dict]:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, Wav2Vec2Config

    vae = {k: v for k, v in AutoencoderKL.load_config(folder / "vae").items() if not k.startswith("_")}
    return {"vae": vae, "clip": CLIPTextConfig.from_pretrained(folder / "clip").to_dict(),
            "wav2vec2": Wav2Vec2Config.from_pretrained(folder / "wav2vec2").to_dict()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny model folder, its configurations, and its VAE, CLIP and wav2vec2 as single files."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, Wav2Vec2Model

    root = tmp_path_factory.mktemp("single_file")
    folder = write_tiny_models(root / "tiny")
    files = root / "files"
    files.mkdir()
    vae = AutoencoderKL.from_pretrained(folder / "vae").state_dict()
    save_file(to_ldm_vae(vae, num_up=4), files / "vae_ldm.safetensors")
    save_file({"first_stage_model." + k: v for k, v in to_ldm_vae(vae, 4).items()}, files / "vae_prefixed.safetensors")
    save_file({k: v.contiguous() for k, v in vae.items()}, files / "vae_diffusers.safetensors")
    # ComfyUI's clip_l layout (transformers 5 names the same tensors without the text_model. prefix)
    clip = {"text_model." + k.removeprefix("text_model."): v
            for k, v in CLIPTextModel.from_pretrained(folder / "clip").state_dict().items()}
    save_file({**clip, "text_projection.weight": torch.zeros(4, 768), "logit_scale": torch.tensor(4.6)},
              files / "clip_l.safetensors")
    save_file({"cond_stage_model.transformer." + k: v for k, v in clip.items()}, files / "clip_prefixed.safetensors")
    w2v = Wav2Vec2Model.from_pretrained(folder / "wav2vec2").state_dict()
    save_file(w2v, files / "wav2vec2_comfy.safetensors")  # ComfyUI's layout: parametrized weight norm
    hf = {"wav2vec2." + k.replace("parametrizations.weight.original0", "weight_g")
          .replace("parametrizations.weight.original1", "weight_v"): v for k, v in w2v.items()}
    save_file({**hf, "lm_head.weight": torch.zeros(32, 8), "lm_head.bias": torch.zeros(32)},
              files / "wav2vec2_ctc.safetensors")  # an HF Wav2Vec2ForCTC file
    return types.SimpleNamespace(folder=folder, files=files, configs=_tiny_configs(folder))


# ---- library ------------------------------------------------------------------------------------------
def test_default_configs_are_the_released_architectures():
    """Parameter counts of sd-vae-ft-mse, the CLIP ViT-L/14 text tower and wav2vec2-base."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, Wav2Vec2Config, Wav2Vec2Model

    with torch.device("meta"):
        models = (AutoencoderKL(**single_file.SD_VAE_CONFIG),
                  CLIPTextModel(CLIPTextConfig(**single_file.CLIP_L_TEXT_CONFIG)),
                  Wav2Vec2Model(Wav2Vec2Config(**single_file.WAV2VEC2_BASE_CONFIG)))
    assert [sum(p.numel() for p in m.parameters()) for m in models] == [83_653_863, 123_060_480, 94_371_712]


@pytest.mark.parametrize("name", ["vae_ldm", "vae_prefixed", "vae_diffusers"])
def test_vae_file_gives_the_folder_model(tiny, name):
    from diffusers import AutoencoderKL

    expected = AutoencoderKL.from_pretrained(tiny.folder / "vae")
    vae = single_file.load_vae_file(tiny.files / f"{name}.safetensors", config=tiny.configs["vae"])
    assert isinstance(vae, AutoencoderKL) and not vae.training
    assert vae.config.scaling_factor == expected.config.scaling_factor
    image = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(image).latent_dist.mean
        assert latents.shape == (1, 4, 4, 4) and latents.std() > 0
        torch.testing.assert_close(latents, expected.encode(image).latent_dist.mean, rtol=0, atol=0)
        torch.testing.assert_close(vae.decode(latents).sample, expected.decode(latents).sample, rtol=0, atol=0)
    half = single_file.load_vae_file(tiny.files / f"{name}.safetensors", torch.float16, config=tiny.configs["vae"])
    assert {p.dtype for p in half.parameters()} == {torch.float16}


@pytest.mark.parametrize("name", ["clip_l", "clip_prefixed"])
def test_clip_file_gives_the_folder_encoder(tiny, name):
    expected = EmotionTextEncoder.from_pretrained(tiny.folder / "clip")
    encoder = single_file.load_clip_text_file(tiny.files / f"{name}.safetensors", tiny.folder / "clip",
                                              config=tiny.configs["clip"])
    assert isinstance(encoder, EmotionTextEncoder)
    prompts = ["the anger", ""]
    out = encoder.encode(prompts)
    assert out.shape == (2, 77, 768) and out.std() > 0
    assert torch.equal(out, expected.encode(prompts))


@pytest.mark.parametrize("name", ["wav2vec2_comfy", "wav2vec2_ctc"])
def test_wav2vec2_file_gives_the_folder_features(tiny, name):
    expected = Wav2Vec2AudioEncoder.from_pretrained(tiny.folder / "wav2vec2")
    encoder = single_file.load_wav2vec2_file(tiny.files / f"{name}.safetensors", config=tiny.configs["wav2vec2"])
    assert encoder.processor.do_normalize and encoder.processor.sampling_rate == 16000
    wave = torch.sin(torch.arange(8000) / 7.0) * 0.3 + 0.1  # 0.5 s at 16 kHz, with an offset to normalise
    features = encoder.encode(wave, clip_length=4)
    reference = expected.encode(wave, clip_length=4)
    assert features.features.shape == (16, 2, 8) and features.num_frames == reference.num_frames == 13
    assert torch.equal(features.features, reference.features)


def test_wrong_files_give_errors_naming_the_file(tiny):
    clip_file, vae_file = tiny.files / "clip_l.safetensors", tiny.files / "vae_ldm.safetensors"
    with pytest.raises(ValueError, match=rf"{re.escape(str(clip_file))} is not an SD1.5 VAE.*missing"):
        single_file.load_vae_file(clip_file, config=tiny.configs["vae"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(vae_file))} is not a CLIP-L text encoder"):
        single_file.load_clip_text_file(vae_file, tiny.folder / "clip", config=tiny.configs["clip"])
    with pytest.raises(ValueError, match=rf"{re.escape(str(clip_file))} is not a wav2vec2-base model"):
        single_file.load_wav2vec2_file(clip_file, config=tiny.configs["wav2vec2"])
    # the right kind of file, another size: the real CLIP-L config against the tiny weights
    vocab = tiny.configs["clip"]["vocab_size"]
    with pytest.raises(ValueError, match=r"clip_l.safetensors is not a CLIP-L.*wrong shape: (text_model\.)?embeddings"
                                         rf".token_embedding.weight \({vocab}, 768\) \(expected \(49408, 768\)\)"):
        single_file.load_clip_text_file(clip_file, tiny.folder / "clip")
    with pytest.raises(FileNotFoundError, match=r"nope.safetensors does not exist"):
        single_file.load_vae_file(tiny.files / "nope.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no CLIP tokenizer in .*files.*sd1_tokenizer"):
        single_file.load_clip_text_file(clip_file, tiny.files)
    (tiny.files / "notes.txt").write_text("not weights")
    with pytest.raises(ValueError, match=r"notes.txt: is not a weights file"):
        single_file.load_vae_file(tiny.files / "notes.txt")


def test_torch_files_are_read_without_pickled_code(tiny, tmp_path):
    state = load_state_dict(tiny.files / "vae_ldm.safetensors")
    torch.save({"state_dict": state}, tmp_path / "vae.ckpt")
    again = load_state_dict(tmp_path / "vae.ckpt")
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)
    torch.save({"state_dict": state, "step": types.SimpleNamespace(n=1)}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match=r"pickled\.ckpt: holds Python objects other than tensors and plain "
                                         r"containers \(it holds a types\.SimpleNamespace\); refusing to unpickle "
                                         r"it, since that could run code") as info:
        load_state_dict(tmp_path / "pickled.ckpt")
    assert "weights_only=False" not in str(info.value)  # torch's advice would run the file's code


# ---- model paths and the pipeline ---------------------------------------------------------------------------
def _bare_folder(tiny, dest: Path) -> Path:
    """A model folder with only the networks and the face models: vae/, clip/, wav2vec2/ come as files."""
    dest.mkdir()
    for name in ("emocast.safetensors", "config.json"):
        shutil.copy(tiny.folder / name, dest / name)
    shutil.copytree(tiny.folder / "face_analysis", dest / "face_analysis")
    return dest


def test_model_paths_overrides_replace_the_sub_folders(tiny, tmp_path):
    bare = _bare_folder(tiny, tmp_path / "bare")
    with pytest.raises(FileNotFoundError, match=r"(?s)3 model file\(s\) missing.*VAE folder.*CLIP.*folder.*wav2vec2 "
                                                 r"folder") as err:
        ModelPaths.resolve(bare)
    assert "tokenizer" not in str(err.value)
    files = dict(vae_file=tiny.files / "vae_ldm.safetensors", clip_file=tiny.files / "clip_l.safetensors",
                 wav2vec2_file=tiny.files / "wav2vec2_comfy.safetensors")
    paths = ModelPaths.resolve(bare, tokenizer_dir=tiny.folder / "clip", **files)
    assert (paths.vae_file, paths.clip_file, paths.wav2vec2_file) == tuple(files.values())
    assert paths.tokenizer_dir == tiny.folder / "clip"
    # a CLIP file needs a tokenizer: by default the model folder's clip/
    with pytest.raises(FileNotFoundError, match=r"(?s)1 model file\(s\) missing.*CLIP tokenizer folder.*"
                                                r"bare/clip.*sd1_tokenizer"):
        ModelPaths.resolve(bare, **files)
    with pytest.raises(FileNotFoundError, match=r"VAE file: expected at .*missing.safetensors"):
        ModelPaths.resolve(bare, tokenizer_dir=tiny.folder / "clip",
                           **{**files, "vae_file": tiny.files / "missing.safetensors"})
    # without overrides nothing changes
    full = ModelPaths.resolve(tiny.folder)
    assert full.vae_file is full.clip_file is full.tokenizer_dir is full.wav2vec2_file is None


@pytest.fixture
def tiny_defaults(tiny, monkeypatch):
    """The tiny architectures stand in for the released ones that the single-file loaders assume."""
    monkeypatch.setattr(single_file, "SD_VAE_CONFIG", tiny.configs["vae"])
    monkeypatch.setattr(single_file, "CLIP_L_TEXT_CONFIG", tiny.configs["clip"])
    monkeypatch.setattr(single_file, "WAV2VEC2_BASE_CONFIG", tiny.configs["wav2vec2"])


def test_pipeline_loads_the_single_files(tiny, tiny_defaults, tmp_path):
    bare = _bare_folder(tiny, tmp_path / "bare")
    paths = ModelPaths.resolve(bare, vae_file=tiny.files / "vae_ldm.safetensors",
                               clip_file=tiny.files / "clip_l.safetensors", tokenizer_dir=tiny.folder / "clip",
                               wav2vec2_file=tiny.files / "wav2vec2_ctc.safetensors")
    models = EmoCASTModels.load(paths, device="cpu", dtype="fp32")
    folder = EmoCASTModels.load(ModelPaths.resolve(tiny.folder), device="cpu", dtype="fp32")
    for a, b in ((models.vae, folder.vae), (models.text_encoder.text_model, folder.text_encoder.text_model),
                 (models.audio_encoder.model, folder.audio_encoder.model)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---- the loader node ----------------------------------------------------------------------------------------
@pytest.fixture
def comfy_folders(fake_comfy, tiny, tiny_defaults, tmp_path, monkeypatch):  # noqa: F811
    """ComfyUI's vae / text_encoders / audio_encoders folders holding the single files, its shipped
    sd1_tokenizer, and an EmoCAST folder without vae/, clip/, wav2vec2/."""
    fp = fake_comfy.folder_paths
    for key, name in (("vae", "vae_ldm.safetensors"), ("text_encoders", "clip_l.safetensors"),
                      ("audio_encoders", "wav2vec2_comfy.safetensors")):
        folder = tmp_path / "models" / key
        folder.mkdir(parents=True)
        shutil.copy(tiny.files / name, folder / name)
        fp.add_model_folder_path(key, str(folder))
    fp.get_filename_list = lambda key: sorted(p.name for d in fp.get_folder_paths(key) for p in Path(d).iterdir())
    fp.get_full_path = lambda key, name: next(
        (str(Path(d) / name) for d in fp.get_folder_paths(key) if (Path(d) / name).is_file()), None)
    comfy_dir = tmp_path / "comfy"
    shutil.copytree(tiny.folder / "clip", comfy_dir / "sd1_tokenizer",
                    ignore=shutil.ignore_patterns("config.json", "*.safetensors"))
    sys.modules["comfy"].__file__ = str(comfy_dir / "__init__.py")
    root = tmp_path / "emocast"
    root.mkdir()
    _bare_folder(tiny, root / "bare")
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(root))
    yield fake_comfy
    model_cache.MODEL_CACHE.release()


def test_loader_lists_comfyui_files_and_defaults_to_the_model_folder(comfy_folders):
    optional = node("EmoCASTLoader").INPUT_TYPES()["optional"]
    assert optional["vae"][0] == [loader_mod.FROM_FOLDER, "vae_ldm.safetensors"]
    assert optional["clip"][0] == [loader_mod.FROM_FOLDER, "clip_l.safetensors"]
    assert optional["audio_encoder"][0] == [loader_mod.FROM_FOLDER, "wav2vec2_comfy.safetensors"]
    assert {spec[1]["default"] for spec in optional.values()} == {loader_mod.FROM_FOLDER}
    assert adapter.comfy_clip_tokenizer().name == "sd1_tokenizer"


def test_loader_without_comfyui_offers_only_the_model_folder():
    optional = node("EmoCASTLoader").INPUT_TYPES()["optional"]
    assert [spec[0] for spec in optional.values()] == [[loader_mod.FROM_FOLDER]] * 3
    assert adapter.comfy_clip_tokenizer() is None
    with pytest.raises(FileNotFoundError, match=r"'x.safetensors' is not in ComfyUI's models/vae folder "
                                                r"\(ComfyUI is not running\)"):
        adapter.comfy_model_file("vae", "x.safetensors")


def test_loader_with_comfyui_files_runs_the_sampler(comfy_folders, tiny, portrait, speech):  # noqa: F811
    loader = node("EmoCASTLoader")
    with pytest.raises(FileNotFoundError, match=r"(?s)3 model file\(s\) missing"):
        loader.load("bare/emocast.safetensors", "fp32", "cpu", False)
    (handle,) = loader.load("bare/emocast.safetensors", "fp32", "cpu", False, vae="vae_ldm.safetensors",
                            clip="clip_l.safetensors", audio_encoder="wav2vec2_comfy.safetensors")
    spec = handle.spec
    assert spec.vae_file.name == "vae_ldm.safetensors" and spec.wav2vec2_file.name == "wav2vec2_comfy.safetensors"
    assert spec.clip_file.name == "clip_l.safetensors" and spec.tokenizer_dir.name == "sd1_tokenizer"
    assert spec in model_cache.MODEL_CACHE  # the choices are part of the cache key

    face = node("EmoCASTFace").encode(handle, portrait, TINY_SIZE, True)[0]
    (emotion,) = node("EmoCASTEmotion").encode(handle, "0: calm | 0.3: furious", 0.1, 1.0)
    (audio,) = node("EmoCASTAudio").encode(handle, speech, 16)  # one clip: one UNet pass
    frames = node("EmoCASTSampler").sample(handle, face, audio, emotion, steps=1, cfg=3.5, seed=5,
                                           decode_batch=4)[0]
    assert frames.shape == (13, TINY_SIZE, TINY_SIZE, 3) and frames.std() > 0.01
    assert 0 <= frames.min() and frames.max() <= 1

    # the tiny model folder's own sub-folders give the same text and audio conditioning (and the same VAE:
    # test_pipeline_loads_the_single_files), under another cache key
    shutil.copytree(tiny.folder, Path(adapter.model_roots()[-1]) / "full")
    (folder_handle,) = loader.load("full/emocast.safetensors", "fp32", "cpu", False)
    assert folder_handle.spec != spec and folder_handle.spec.vae_file is None
    (folder_emotion,) = node("EmoCASTEmotion").encode(folder_handle, "0: calm | 0.3: furious", 0.1, 1.0)
    (folder_audio,) = node("EmoCASTAudio").encode(folder_handle, speech, 16)
    assert folder_emotion.embeddings.keys() == emotion.embeddings.keys() == {"", "calm", "furious"}
    for prompt, embedding in emotion.embeddings.items():
        assert torch.equal(embedding, folder_emotion.embeddings[prompt])
    assert torch.equal(audio.features.features, folder_audio.features.features)

    text_encoders = Path(comfy_folders.folder_paths.get_folder_paths("text_encoders")[0])
    shutil.copy(tiny.files / "vae_ldm.safetensors", text_encoders / "wrong.safetensors")
    with pytest.raises(ValueError, match=r"text_encoders/wrong.safetensors is not a CLIP-L text encoder"):
        loader.load("bare/emocast.safetensors", "fp32", "cpu", False, vae="vae_ldm.safetensors",
                    clip="wrong.safetensors", audio_encoder="wav2vec2_comfy.safetensors")
