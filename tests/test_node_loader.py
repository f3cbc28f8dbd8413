"""The loader node on model folders whose files are symbolic links (weights linked in from another drive)."""
from __future__ import annotations

import importlib
import sys

import torch

from comfy_stubs import node
from conftest import PACK, load_pack

load_pack()
adapter = sys.modules[f"{PACK}.nodes.comfy_adapter"]
model_cache = sys.modules[f"{PACK}.nodes.model_cache"]


def test_symlinked_network_file_loads_with_the_folders_beside_the_link(tmp_path, monkeypatch):
    """emocast.safetensors links to a file on "another drive" with nothing beside it: vae/, clip/, wav2vec2/
    and face_analysis/ are found beside the link, in the model folder, not beside its target."""
    from emocast_pack.emocast_core.testing.tiny_models import write_tiny_models

    root = tmp_path / "models" / "emocast"
    folder = write_tiny_models(root / "tiny")
    other_drive = tmp_path / "other_drive"
    other_drive.mkdir()
    target = other_drive / "big_weights.safetensors"
    (folder / "emocast.safetensors").rename(target)
    (folder / "emocast.safetensors").symlink_to(target)
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(root))

    assert node("EmoCASTLoader").INPUT_TYPES()["required"]["model"][0] == ["tiny/emocast.safetensors"]
    try:
        (handle,) = node("EmoCASTLoader").load("tiny/emocast.safetensors", "fp32", "cpu", False)
        assert handle.spec.net == folder / "emocast.safetensors"  # the link, not its target
        models = handle.models()
        assert models.dtype == torch.float32 and models.device.type == "cpu"
    finally:
        model_cache.MODEL_CACHE.release()


def test_loader_fp16_on_the_cpu_falls_back_unless_forced(tmp_path, monkeypatch, caplog):
    from emocast_pack.emocast_core.testing.tiny_models import write_tiny_models

    write_tiny_models(tmp_path / "tiny")
    monkeypatch.setenv(adapter.MODELS_DIR_ENV, str(tmp_path))
    precisions = node("EmoCASTLoader").INPUT_TYPES()["required"]["precision"][0]
    runtime = importlib.import_module(f"{PACK}.emocast_core.runtime")
    assert precisions == list(runtime.PRECISIONS)  # the library's choices
    try:
        with caplog.at_level("WARNING"):
            (handle,) = node("EmoCASTLoader").load("tiny/emocast.safetensors", "fp16", "cpu", False)
            assert handle.models().dtype == torch.float32
        assert "fp16-force" in caplog.text
        (forced,) = node("EmoCASTLoader").load("tiny/emocast.safetensors", "fp16-force", "cpu", False)
        assert forced.models().dtype == torch.float16
    finally:
        model_cache.MODEL_CACHE.release()


def test_the_loader_offers_the_library_precisions():
    """The loader's combo is written out (importing the library at ComfyUI's start-up would be heavy): it must
    stay the library's list."""
    from emocast_pack.emocast_core.runtime import PRECISIONS
    from emocast_pack.nodes.loader import PRECISIONS as NODE_PRECISIONS

    assert list(NODE_PRECISIONS) == list(PRECISIONS)
