"""The ComfyUI nodes, loaded the way ComfyUI loads a pack (by file path, as a package), without ComfyUI.

The nodes run on tiny models written in the real formats; the loader finds them through the
EMOCAST_MODELS_DIR environment variable. ComfyUI's hooks (folder registration, progress bar, Cancel) are
exercised with stand-in `folder_paths` / `comfy.*` modules.
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from comfy_stubs import fake_comfy, node, portrait, speech  # noqa: F401  (fixtures)
from conftest import CORE_NODE_SPEC, PACK, ROOT, load_pack
from emocast_core.sampling_settings import SamplingSettings



pack = load_pack()
adapter = sys.modules[f"{PACK}.nodes.comfy_adapter"]
model_cache = sys.modules[f"{PACK}.nodes.model_cache"]
loader_mod = sys.modules[f"{PACK}.nodes.loader"]
NODES = pack.NODE_CLASS_MAPPINGS
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}


# ---- import and metadata ---------------------------------------------------------------------------------

def test_importing_the_pack_is_cheap():
    """A fresh interpreter imports the pack and builds every INPUT_TYPES without torch, numpy or the network."""
    script = f"""
import importlib.util, json, socket, sys
def no_network(*args, **kwargs):
    raise RuntimeError("network access during import")
socket.socket.connect = no_network
socket.create_connection = no_network
spec = importlib.util.spec_from_file_location("pack", {str(ROOT / '__init__.py')!r},
                                              submodule_search_locations=[{str(ROOT)!r}])
pack = importlib.util.module_from_spec(spec); sys.modules["pack"] = pack; spec.loader.exec_module(pack)
infos = {{k: list(c.INPUT_TYPES()["required"]) for k, c in pack.NODE_CLASS_MAPPINGS.items()}}
heavy = [m for m in ("torch", "numpy", "diffusers", "transformers", "insightface", "onnxruntime", "cv2")
         if m in sys.modules]
print(json.dumps({{"nodes": infos, "heavy": heavy}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "EMOCAST_MODELS_DIR": ""})
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["heavy"] == []
    assert set(report["nodes"]) == set(NODES)
    assert report["nodes"]["EmoCASTSampler"][:4] == ["model", "face", "audio_features", "emotion"]


def test_node_metadata():
    assert set(pack.NODE_DISPLAY_NAME_MAPPINGS) == set(NODES)
    assert len(NODES) >= 6
    for node_id, cls in NODES.items():
        assert node_id.startswith("EmoCAST"), node_id
        assert pack.NODE_DISPLAY_NAME_MAPPINGS[node_id].startswith("EmoCAST ")
        assert cls.CATEGORY.split("/")[0] == "EmoCAST"
        assert isinstance(cls.DESCRIPTION, str) and len(cls.DESCRIPTION) > 40
        assert len(cls.RETURN_NAMES) == len(cls.RETURN_TYPES) == len(cls.OUTPUT_TOOLTIPS)
        for t in cls.RETURN_TYPES:
            assert t in ("IMAGE", "MASK", "AUDIO", "FLOAT") or t.startswith("EMOCAST_"), (node_id, t)
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}
        inputs = {**spec.get("required", {}), **spec.get("optional", {})}
        for name, (kind, options) in inputs.items():
            assert options.get("tooltip"), f"{node_id}.{name} has no tooltip"
            assert isinstance(kind, list) or kind in WIDGET_TYPES or kind in ("IMAGE", "AUDIO") \
                or kind.startswith("EMOCAST_"), (node_id, name, kind)
            if "default" in options and isinstance(kind, list):
                assert options["default"] in kind
            if "default" in options and kind in ("INT", "FLOAT"):
                assert options["min"] <= options["default"] <= options["max"], (node_id, name)
        # the function takes exactly the declared inputs, by name
        params = inspect.signature(getattr(cls, cls.FUNCTION)).parameters
        assert list(params)[1:] == list(inputs), node_id


def test_sampler_defaults_and_outputs_fit_create_video():
    required = NODES["EmoCASTSampler"].INPUT_TYPES()["required"]
    defaults = {k: v[1].get("default") for k, v in required.items()}
    release = SamplingSettings()
    assert (defaults["steps"], defaults["cfg"], defaults["seed"]) == (release.steps, release.cfg, release.seed)
    assert (defaults["pose_weight"], defaults["face_weight"], defaults["lip_weight"]) == release.weights
    assert defaults["decode_batch"] == release.decode_batch
    assert NODES["EmoCASTAudio"].INPUT_TYPES()["required"]["clip_length"][1]["default"] == release.clip_length
    core = json.loads(CORE_NODE_SPEC.read_text())["CreateVideo"]
    create_inputs = {**core["input"]["required"], **core["input"]["optional"]}
    sampler = NODES["EmoCASTSampler"]
    outputs = dict(zip(sampler.RETURN_NAMES, sampler.RETURN_TYPES))
    assert outputs["frames"] == create_inputs["images"][0]
    assert outputs["audio"] == create_inputs["audio"][0]
    assert outputs["fps"] == create_inputs["fps"][0]
    assert create_inputs["fps"][1]["min"] <= 25 <= create_inputs["fps"][1]["max"]


def test_changed_sampling_defaults_reach_the_cli_and_the_widgets(monkeypatch, capsys):
    """The defaults are written once, in SamplingSettings: the CLI's options and help and the nodes' widgets
    read them from there."""
    import emocast_core.sampling_settings as library
    from emocast_core.cli import COMMANDS
    from emocast_core.cli.table import build_parser

    changed = {"steps": 17, "cfg": 2.25, "seed": 7, "clip_length": 12, "decode_batch": 3, "weights": (0.5, 0.75, 1.5)}
    for module in (library, importlib.import_module(f"{PACK}.emocast_core.sampling_settings")):
        for name, value in changed.items():
            monkeypatch.setattr(module.SamplingSettings, name, value)

    parser = build_parser(COMMANDS, "emocast", "test")
    args = parser.parse_args(["generate", "--models", "m", "--image", "i.png", "--audio", "a.wav", "--out", "o.mp4"])
    assert (args.steps, args.cfg, args.seed, args.clip_length) == (17, 2.25, 7, 12)
    assert (args.pose_weight, args.face_weight, args.lip_weight) == (0.5, 0.75, 1.5)
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for phrase in ("DDIM steps per clip (default 17, as released)", "(default 2.25, as released)",
                   "random seed (default 7, as released)", "frames generated together (default 12, as released)",
                   "lip audio branch (default 1.5)"):
        assert phrase in help_text

    sampler = {k: v[1].get("default") for k, v in NODES["EmoCASTSampler"].INPUT_TYPES()["required"].items()}
    assert (sampler["steps"], sampler["cfg"], sampler["seed"], sampler["decode_batch"]) == (17, 2.25, 7, 3)
    assert (sampler["pose_weight"], sampler["face_weight"], sampler["lip_weight"]) == (0.5, 0.75, 1.5)
    assert NODES["EmoCASTAudio"].INPUT_TYPES()["required"]["clip_length"][1]["default"] == 12


# ---- model folders ---------------------------------------------------------------------------------------

def _fake_model_folder(folder: Path, net: str = "emocast.safetensors") -> Path:
    (folder / "vae").mkdir(parents=True, exist_ok=True)
    (folder / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    (folder / net).write_bytes(b"x")
    return folder / net


def test_model_listing(tmp_path, monkeypatch):
    a, b = tmp_path / "a", tmp_path / "b"
    _fake_model_folder(a)
    _fake_model_folder(a / "variant", "my_finetune.safetensors")
    (a / "loose").mkdir()
    (a / "loose" / "notes.safetensors").write_bytes(b"x")  # no vae/ beside it: not a model
    (a / "loose" / "net.pth").write_bytes(b"x")  # a known network name is listed (errors explain the rest)
    _fake_model_folder(b)  # same relative name as in a: a wins
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, os.pathsep.join(map(str, (a, tmp_path / "missing", b))))
    choices = NODES["EmoCASTLoader"].INPUT_TYPES()["required"]["model"][0]
    assert choices == ["emocast.safetensors", "loose/net.pth", "variant/my_finetune.safetensors"]
    assert loader_mod.resolve_choice("variant/my_finetune.safetensors") == a / "variant" / "my_finetune.safetensors"
    with pytest.raises(FileNotFoundError, match="not in any model folder"):
        loader_mod.resolve_choice("gone.safetensors")
    with pytest.raises(ValueError, match="relative to a model folder"):
        loader_mod.resolve_choice("../b/emocast.safetensors")
    # a listed file whose folder lacks the other models: the library names every missing part
    with pytest.raises(FileNotFoundError, match="wav2vec2"):
        node("EmoCASTLoader").load("loose/net.pth", "fp32", "cpu", False)

    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path / "empty"))
    choices = NODES["EmoCASTLoader"].INPUT_TYPES()["required"]["model"][0]
    assert choices == [loader_mod.NO_MODELS]
    with pytest.raises(FileNotFoundError, match="models/emocast") as err:
        node("EmoCASTLoader").load(loader_mod.NO_MODELS, "auto", "auto", False)
    assert str(tmp_path / "empty") in str(err.value)


def test_loader_rejects_bad_options(tmp_path, monkeypatch):
    _fake_model_folder(tmp_path)
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path))
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, fp16, bf16"):
        node("EmoCASTLoader").load("emocast.safetensors", "fp8", "cpu", False)
    with pytest.raises(ValueError, match="device must be one of"):
        node("EmoCASTLoader").load("emocast.safetensors", "fp32", "tpu", False)


def test_registers_the_emocast_model_folder(fake_comfy, tmp_path, monkeypatch):
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path / "extra"))
    folder = adapter.register_model_folder()
    adapter.register_model_folder()  # a second import must not add it twice
    assert folder == tmp_path / "models" / "emocast"
    assert fake_comfy.folder_paths.folder_names_and_paths["emocast"][0] == [str(folder)]
    assert adapter.model_roots() == [folder, tmp_path / "extra"]
    _fake_model_folder(folder)
    assert NODES["EmoCASTLoader"].INPUT_TYPES()["required"]["model"][0] == ["emocast.safetensors"]


def test_without_comfyui_the_adapter_falls_back():
    assert adapter.register_model_folder() is None
    update = adapter.make_progress(5)
    update(3)  # a no-op, but callable
    assert adapter.interrupted() is False
    assert adapter.compute_device() is None
    assert adapter.output_device() == "cpu"
    assert adapter.manage_models({"net": torch.nn.Linear(2, 2)}, torch.device("cpu")) is None
    adapter.unload_models([])  # nothing to unload, and no error
    with pytest.raises(ValueError, match="without ComfyUI"):
        adapter.load_on_device([object()])
    err = RuntimeError("stop")
    with pytest.raises(RuntimeError, match="stop"):
        adapter.raise_cancelled(err)


def test_model_cache_keys_capacity_and_release():
    loads = []

    def fake_load(spec):
        loads.append(spec)
        return model_cache.LoadedModels(object())

    cache = model_cache.ModelCache(capacity=1, loader=fake_load)
    fp32 = model_cache.LoadSpec(Path("/m/emocast.safetensors"), "fp32", "cpu")
    fp16 = model_cache.LoadSpec(Path("/m/emocast.safetensors"), "fp16", "cpu")
    first = cache.get(fp32)
    assert cache.get(fp32) is first and loads == [fp32]
    cache.get(fp16)  # another precision is another model; capacity 1 drops the fp32 one first
    assert loads == [fp32, fp16] and fp32 not in cache and fp16 in cache
    assert cache.release() == 1 and len(cache) == 0
    handle = model_cache.ModelHandle(fp16, cache)
    assert handle.models() is not first.models and loads == [fp32, fp16, fp16]  # loaded again after a release
    with pytest.raises(ValueError, match="capacity"):
        model_cache.ModelCache(capacity=0)


def test_offloaded_models_visit_the_device_only_while_used(monkeypatch):
    runtime = importlib.import_module(f"{PACK}.emocast_core.runtime")
    moves, room = [], []
    monkeypatch.setattr(runtime, "move_models", lambda models, device, parts: moves.append((str(device), parts)))
    monkeypatch.setattr(runtime, "parameter_bytes", lambda models, parts: 1000 * len(parts))
    monkeypatch.setattr(adapter, "make_room", lambda n, device: room.append((n, str(device))))
    gpu_models = types.SimpleNamespace(device=torch.device("cuda"))
    cache = model_cache.ModelCache(loader=lambda spec: model_cache.LoadedModels(gpu_models))
    handle = model_cache.ModelHandle(model_cache.LoadSpec(Path("/m/x.safetensors"), offload=True), cache)
    with handle.use("net", "vae") as models:
        assert models is gpu_models and moves == [("cuda", ("net", "vae"))]
    assert moves[-1] == ("cpu", ("net", "vae")) and room == [(2000, "cuda")]
    with pytest.raises(KeyError):
        with handle.use("text_encoder"):
            raise KeyError("boom")
    assert moves[-1] == ("cpu", ("text_encoder",))  # moved back even when the node fails
    resident = model_cache.ModelHandle(model_cache.LoadSpec(Path("/m/x.safetensors"), offload=False), cache)
    moves.clear()
    with resident.use("net"):
        pass
    assert moves == []


def _small_parts() -> dict[str, torch.nn.Module]:
    return {"net": torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)), "vae": torch.nn.Linear(2, 2)}


def test_load_on_device_moves_what_comfyui_left_behind(fake_comfy, caplog):
    """--novram: ComfyUI moves none of a plain torch model; the parts are then moved in full, not run split."""
    split = _small_parts()
    split["net"][1].to("meta")  # half of the network on the device (meta stands in for a GPU)
    with pytest.raises(ValueError, match="'net' must have its weights on one device"):
        adapter.manage_models(split, torch.device("meta"))
    parts = _small_parts()
    patchers = adapter.manage_models(parts, torch.device("meta"))
    assert [p.model.device for p in patchers.values()] == [torch.device("cpu")] * 2
    patchers["net"].load = lambda: None  # ComfyUI loads nothing of it
    with caplog.at_level("WARNING", logger="emocast.nodes"):
        assert adapter.load_on_device(patchers.values()) == torch.device("meta")
    assert {p.device for m in parts.values() for p in m.parameters()} == {torch.device("meta")}
    assert patchers["net"].model.device == torch.device("meta")
    assert "left EmoCAST weights on cpu; moving them all to meta" in caplog.text
    assert fake_comfy.calls["load_models_gpu"] == [(list(patchers.values()), True)]


def test_offloaded_parts_under_comfyui_visit_the_device_only_while_used(fake_comfy):
    models = types.SimpleNamespace(device=torch.device("cuda"))
    cache = model_cache.ModelCache(loader=lambda spec: model_cache.LoadedModels(
        models, adapter.manage_models(_small_parts(), torch.device("cpu"))))
    handle = model_cache.ModelHandle(model_cache.LoadSpec(Path("/m/x.safetensors"), offload=True), cache)
    patchers = cache.get(handle.spec).patchers
    mm = fake_comfy.mm
    with handle.use("net") as used:
        assert used is models and [e.model for e in mm.current_loaded_models] == [patchers["net"]]
        assert models.device == torch.device("cpu")  # follows where ComfyUI loaded the weights
    assert fake_comfy.calls["load_models_gpu"] == [([patchers["net"]], True)]
    assert mm.current_loaded_models == [] and patchers["net"].detached == 1  # off the device and off the list
    with pytest.raises(KeyError):
        with handle.use("vae"):
            raise KeyError("boom")
    assert mm.current_loaded_models == [] and patchers["vae"].detached == 1  # unloaded even when the node fails
    with handle.use() as used:  # no torch part (the face node): nothing is loaded
        assert used is models
    assert len(fake_comfy.calls["load_models_gpu"]) == 2


# ---- the nodes on tiny models ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models_root(tmp_path_factory):
    from emocast_pack.emocast_core.testing.tiny_models import write_tiny_models

    root = tmp_path_factory.mktemp("comfy_models")
    write_tiny_models(root / "tiny", separator=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(adapter.MODELS_DIR_ENV, str(root))
        yield root
    model_cache.MODEL_CACHE.release()


@pytest.fixture(scope="module")
def handle(models_root):
    return node("EmoCASTLoader").load("tiny/emocast.safetensors", "fp32", "cpu", False)[0]


@pytest.fixture(scope="module")
def encoded(handle, portrait, speech):
    from emocast_pack.emocast_core.testing.tiny_models import TINY_SIZE

    face_out = node("EmoCASTFace").encode(handle, portrait, TINY_SIZE, True)
    (emotion,) = node("EmoCASTEmotion").encode(handle, "0: calm | 0.3: furious", 0.1, 1.0)
    (audio,) = node("EmoCASTAudio").encode(handle, speech, 8)
    return types.SimpleNamespace(face_out=face_out, face=face_out[0], emotion=emotion, audio=audio)


def test_loader_caches_by_path_precision_device(handle, models_root):
    models = handle.models()
    assert models.device.type == "cpu" and models.dtype == torch.float32
    assert handle.spec.net == (models_root / "tiny" / "emocast.safetensors").resolve()
    again = node("EmoCASTLoader").load("tiny/emocast.safetensors", "fp32", "cpu", False)[0]
    assert again == handle and again.models() is models  # same spec: nothing loaded twice


def test_face_node(encoded, portrait, handle):
    from emocast_pack.emocast_core.testing.tiny_models import TINY_SIZE

    face, crop, face_mask, lip_mask, attention = encoded.face_out
    cond = face.prepared
    assert face.image_size == (512, 512) and face.size == TINY_SIZE
    assert crop.shape == (1, TINY_SIZE, TINY_SIZE, 3) and crop.dtype == torch.float32
    torch.testing.assert_close(crop[0].permute(2, 0, 1), (cond.reference + 1) / 2)
    assert 0 <= crop.min() and crop.max() <= 1 and crop.std() > 0.05
    assert face_mask.shape == lip_mask.shape == (1, TINY_SIZE, TINY_SIZE)
    assert torch.equal(face_mask, cond.face_region[:1])  # the FaceLocator's input (edges resampled)
    assert face_mask.min() == 0 and face_mask.max() == 1
    assert set(lip_mask.unique().tolist()) == {0.0, 1.0}
    x0, y0, x1, y1 = cond.lip_rect
    assert lip_mask[0, y0:y1, x0:x1].min() == 1 and lip_mask.sum() == (x1 - x0) * (y1 - y0)
    assert (face_mask * lip_mask).sum() > 0.5 * lip_mask.sum()  # the lips are inside the face box
    assert attention.shape == (3, TINY_SIZE, TINY_SIZE)
    assert 0 <= attention.min() and attention.max() <= 1
    # lip attention peaks on the lips, the pose (background) mask away from the face
    assert attention[2][lip_mask[0] > 0].mean() > attention[2][lip_mask[0] == 0].mean() + 0.2
    assert attention[0][face_mask[0] > 0].mean() < attention[0][face_mask[0] == 0].mean()

    with pytest.raises(ValueError, match="ImageFromBatch"):
        node("EmoCASTFace").encode(handle, portrait.repeat(2, 1, 1, 1), TINY_SIZE, True)
    with pytest.raises(ValueError, match="[Nn]o face"):
        node("EmoCASTFace").encode(handle, torch.full((1, 256, 256, 3), 0.5), TINY_SIZE, True)
    with pytest.raises(ValueError, match="multiple of 64"):
        node("EmoCASTFace").encode(handle, portrait, 100, True)


def test_emotion_node(encoded, handle):
    from emocast_pack.emocast_core.emotion import build_emotion_schedule

    emotion = encoded.emotion
    assert [k.prompt for k in emotion.keys] == ["calm", "furious"] and emotion.crossfade == pytest.approx(0.1)
    assert set(emotion.embeddings) == {"", "calm", "furious"}
    # laid out later from the stored embeddings: identical to encoding with the text encoder directly
    direct = build_emotion_schedule(handle.models().text_encoder, emotion.text, 13, fps=25, crossfade=0.1)
    stored = emotion.schedule(13)
    assert torch.equal(stored.per_frame, direct.per_frame) and torch.equal(stored.uncond, direct.uncond)
    assert not torch.equal(stored.per_frame[0], stored.per_frame[-1])  # the timeline changes the emotion
    (strong,) = node("EmoCASTEmotion").encode(handle, "happy", 0.5, 1.5)
    assert set(strong.embeddings) == {"", "happy"}  # the neutral text of the strength blend is CLIP("")
    with pytest.raises(ValueError, match="strictly increasing"):
        node("EmoCASTEmotion").encode(handle, "0: calm | 0: sad", 0.5, 1.0)
    with pytest.raises(ValueError, match="77"):
        node("EmoCASTEmotion").encode(handle, "very " * 80 + "happy", 0.5, 1.0)


def test_audio_node(encoded, speech, handle, monkeypatch):
    audio = encoded.audio
    assert audio.clip.sample_rate == 44100 and audio.clip.waveform.shape == (2, 22050)
    assert audio.num_frames == math.ceil(0.5 * 25) == 13
    assert audio.clip_length == 8 and audio.features.features.shape[0] == 16
    # the model folder's vocal separator runs first unless switched off
    separator = handle.models().separator
    calls = []
    real = separator.separate
    monkeypatch.setattr(separator, "separate", lambda clip: calls.append(clip) or real(clip))
    node("EmoCASTAudio").encode(handle, speech, 8, False)
    assert calls == []
    (again,) = node("EmoCASTAudio").encode(handle, speech, 8, True)
    assert len(calls) == 1 and calls[0].sample_rate == 44100
    assert torch.equal(again.features.features, audio.features.features)
    with pytest.raises(ValueError, match="batch of 2"):
        node("EmoCASTAudio").encode(handle, {"waveform": speech["waveform"].repeat(2, 1, 1),
                                             "sample_rate": 44100}, 8)
    with pytest.raises(ValueError, match="silent"):
        node("EmoCASTAudio").encode(handle, {"waveform": torch.zeros(1, 1, 16000), "sample_rate": 16000}, 8)
    with pytest.raises(ValueError, match="AUDIO dict"):
        node("EmoCASTAudio").encode(handle, torch.zeros(1, 1, 16000), 8)


def test_sampler_outputs_progress_and_parity(encoded, handle, portrait, speech, monkeypatch):
    from emocast_pack.emocast_core.pipeline import GenerationRequest, generate
    from emocast_pack.emocast_core.sampling_settings import SamplingSettings  # noqa: F811  (the pack's own)
    from emocast_pack.nodes import tensors

    updates, totals = [], []

    def fake_progress(total):
        totals.append(total)
        return updates.append

    monkeypatch.setattr(adapter, "make_progress", fake_progress)
    frames, audio, fps = node("EmoCASTSampler").sample(handle, encoded.face, encoded.audio, encoded.emotion,
                                                       steps=2, cfg=3.5, seed=5, decode_batch=3)
    n = encoded.audio.num_frames
    assert frames.shape == (n, encoded.face.size, encoded.face.size, 3) and frames.dtype == torch.float32
    assert frames.is_contiguous() and 0 <= frames.min() and frames.max() <= 1 and frames.std() > 0.01
    assert fps == 25.0 and isinstance(fps, float)
    assert totals == [2 * 2] and updates == [1, 2, 3, 4]  # 2 clips x 2 steps
    assert audio["sample_rate"] == 44100 and audio["waveform"].shape == (1, 2, round(n / fps * 44100))
    assert audio["waveform"].shape[-1] / audio["sample_rate"] == pytest.approx(n / fps, abs=1e-12)
    torch.testing.assert_close(audio["waveform"][0, :, :22050], speech["waveform"][0])  # then zero padding

    # the node graph gives exactly the frames of the one-call pipeline
    request = GenerationRequest(image=tensors.image_to_portrait(portrait), audio=tensors.audio_to_clip(speech),
                                emotion="0: calm | 0.3: furious", size=encoded.face.size, crossfade=0.1,
                                sampling=SamplingSettings(steps=2, cfg=3.5, seed=5, clip_length=8, decode_batch=3))
    expected = generate(handle.models(), request)
    assert torch.equal(frames, expected.frames.permute(0, 2, 3, 1))


def test_sampler_cancel_without_comfyui(encoded, handle, monkeypatch):
    from emocast_pack.emocast_core.sampling import GenerationCancelled

    checks = []
    monkeypatch.setattr(adapter, "interrupted", lambda: checks.append(1) or len(checks) > 1)
    with pytest.raises(GenerationCancelled):
        node("EmoCASTSampler").sample(handle, encoded.face, encoded.audio, encoded.emotion, steps=3)
    assert len(checks) == 2  # before the first clip, then after step 1


def test_sampler_with_comfyui_progress_bar_and_cancel(encoded, handle, fake_comfy):
    fake_comfy.state["interrupt_after"] = 1  # the user presses Cancel after the first step
    with pytest.raises(fake_comfy.mm.InterruptProcessingException):
        node("EmoCASTSampler").sample(handle, encoded.face, encoded.audio, encoded.emotion, steps=3)
    assert fake_comfy.calls["progress"] == [(1, 2 * 3)]


def test_sampler_rejects_bad_settings(encoded, handle):
    with pytest.raises(ValueError, match="cfg must be above 1.0"):
        node("EmoCASTSampler").sample(handle, encoded.face, encoded.audio, encoded.emotion, steps=1, cfg=1.0)


def test_paste_back_node(encoded, portrait):
    face = encoded.face
    x0, y0, x1, y1 = face.prepared.crop_box
    frames = torch.rand(3, face.size, face.size, 3)
    (pasted,) = node("EmoCASTPasteBack").paste(portrait, frames, face, 8)
    assert pasted.shape == (3, 512, 512, 3) and pasted.dtype == torch.float32
    outside = torch.ones(512, 512, dtype=torch.bool)
    outside[max(y0, 0):y1, max(x0, 0):x1] = False
    assert torch.equal(pasted[:, outside], portrait.expand(3, -1, -1, -1)[:, outside])
    # the centre of the box is the generated frame, scaled to the box
    cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
    scaled = torch.nn.functional.interpolate(frames.permute(0, 3, 1, 2), size=(y1 - y0, x1 - x0), mode="bilinear",
                                             antialias=True).permute(0, 2, 3, 1)
    torch.testing.assert_close(pasted[:, cy, cx], scaled[:, cy - y0, cx - x0].clamp(0, 1))
    with pytest.raises(ValueError, match="256x256"):
        node("EmoCASTPasteBack").paste(portrait[:, :256, :256], frames, face, 8)


def test_paste_back_feathers_only_inside_the_picture():
    from emocast_pack.emocast_core.paste_back import feather_mask, paste_back

    background = torch.zeros(1, 3, 40, 60)
    frames = torch.ones(2, 3, 16, 16)
    out = paste_back(background, frames, (-8, 10, 24, 42), feather=4)  # 32 px box, over the left/bottom border
    assert out.shape == (2, 3, 40, 60)
    assert out[:, :, :10].abs().max() == 0 and out[:, :, :, 24:].abs().max() == 0
    assert torch.equal(out[0, 0, 39, 0:20], torch.ones(20))  # hard at the picture's border
    assert out[0, 0, 10, 10] < 0.2 and out[0, 0, 25, 23] < 0.2  # soft towards the inside
    assert out[0, 0, 25, 10] == 1
    mask = feather_mask(8, 8, 2, (True, False, False, False))
    assert mask[0].tolist() == [0.25] * 8 and mask[1].tolist() == [0.75] * 8 and mask[2:].min() == 1
    with pytest.raises(ValueError, match="outside"):
        paste_back(background, frames, (100, 100, 116, 116))
    with pytest.raises(ValueError, match="3 frames"):
        paste_back(torch.zeros(3, 3, 40, 60), torch.ones(5, 3, 16, 16), (0, 0, 16, 16))


def test_unload_frees_and_the_handle_reloads(handle):
    first = handle.models()
    frames = torch.zeros(2, 8, 8, 3)
    (out,) = node("EmoCASTUnloadModels").unload(frames)
    assert out is frames and len(model_cache.MODEL_CACHE) == 0
    assert handle.models() is not first and handle.spec in model_cache.MODEL_CACHE


def test_comfyui_loads_offloads_and_unloads_the_models(fake_comfy, models_root, encoded, portrait, speech,
                                                       monkeypatch):
    """Under ComfyUI the torch parts are ModelPatchers: loaded before each node's work, unloadable by ComfyUI."""
    from emocast_pack.emocast_core import generation_steps, runtime
    from emocast_pack.emocast_core.testing.tiny_models import TINY_SIZE

    calls, mm = fake_comfy.calls, fake_comfy.mm
    # "auto" precision: another cache entry than the module's handle, loaded while ComfyUI runs
    handle = node("EmoCASTLoader").load("tiny/emocast.safetensors", "auto", "cpu", False)[0]
    models = handle.models()
    patchers = model_cache.MODEL_CACHE.get(handle.spec).patchers
    names = {id(p): name for name, p in patchers.items()}
    # one patcher per torch part, holding the library's own module (one copy of the weights)
    assert calls["patchers"] == list(patchers.values()) and tuple(patchers) == runtime.MOVABLE_PARTS
    for name, module in runtime.part_modules(models).items():
        assert getattr(patchers[name].model, name) is module
        assert patchers[name].load_device == patchers[name].offload_device == torch.device("cpu")
    # loaded straight onto the device: registered with ComfyUI as loaded, in full
    assert calls["load_models_gpu"] == [(list(patchers.values()), True)]
    assert sorted(names[id(e.model)] for e in mm.current_loaded_models) == sorted(patchers)
    assert node("EmoCASTLoader").load("tiny/emocast.safetensors", "auto", "cpu", False)[0].models() is models
    assert len(calls["patchers"]) == 4  # made once per load

    events = []
    real_load = mm.load_models_gpu
    monkeypatch.setattr(mm, "load_models_gpu", lambda ps, **kw: events.append(("load", [names[id(p)] for p in ps]))
                        or real_load(ps, **kw))
    for fn in ("encode_face", "encode_emotion", "encode_audio", "sample"):
        monkeypatch.setattr(generation_steps, fn, lambda *a, _fn=fn, _real=getattr(generation_steps, fn), **k:
                            events.append(_fn) or _real(*a, **k))
    node("EmoCASTFace").encode(handle, portrait, TINY_SIZE, True)
    node("EmoCASTEmotion").encode(handle, "happy", 0.5, 1.0)
    node("EmoCASTAudio").encode(handle, speech, 8)
    frames = node("EmoCASTSampler").sample(handle, encoded.face, encoded.audio, encoded.emotion, steps=1, seed=3)[0]
    assert events == ["encode_face", ("load", ["text_encoder"]), "encode_emotion", ("load", ["audio_encoder"]),
                      "encode_audio", ("load", ["net", "vae"]), "sample"]
    assert all(full for _, full in calls["load_models_gpu"])  # plain torch layers: never a partial load

    # ComfyUI unloads everything ("Unload models", POST /free, an out-of-memory error) ...
    mm.unload_all_models()
    assert mm.current_loaded_models == [] and [p.detached for p in patchers.values()] == [1] * 4
    assert handle.spec in model_cache.MODEL_CACHE  # the CPU copy stays cached
    # ... and the next run loads the parts again and runs where ComfyUI put them
    models.device = torch.device("meta")
    again = node("EmoCASTSampler").sample(handle, encoded.face, encoded.audio, encoded.emotion, steps=1, seed=3)[0]
    assert events[-2:] == [("load", ["net", "vae"]), "sample"] and models.device == torch.device("cpu")
    assert torch.equal(again, frames)
    assert sorted(names[id(e.model)] for e in mm.current_loaded_models) == ["net", "vae"]

    # the Unload node takes every part off ComfyUI's list and out of the device, then drops the models
    node("EmoCASTUnloadModels").unload(frames)
    assert mm.current_loaded_models == [] and [p.detached for p in patchers.values()] == [2] * 4
    assert len(model_cache.MODEL_CACHE) == 0


def test_requirements_mirror_pyproject_without_torch():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    requirements = [line for line in lines if line and not line.startswith("#")]
    expected = [d for d in project["dependencies"] if not d.startswith(("torch>", "torchaudio>", "torchvision>"))]
    assert requirements == expected
    assert all(">=" in r and "==" not in r and "<" not in r for r in requirements)
