"""Stand-ins for the ComfyUI modules the pack uses, and ComfyUI-typed test inputs (shared by the node tests).

Import the fixtures into a test module with `from comfy_stubs import fake_comfy, ...`.
"""
from __future__ import annotations

import sys
import types

import pytest
import torch
from skimage import data as skdata

from conftest import load_pack

NODES = load_pack().NODE_CLASS_MAPPINGS


def node(name: str):
    return NODES[name]()


class FakeModelPatcher:
    """`comfy.model_patcher.ModelPatcher` as far as the pack relies on it: it moves `model` and records where."""

    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.model, self.load_device, self.offload_device = model, load_device, offload_device
        if getattr(model, "device", None) is None:
            model.device = offload_device
        self.detached = 0

    def current_loaded_device(self):
        return self.model.device

    def load(self):
        self.model.to(self.load_device)
        self.model.device = self.load_device

    def detach(self, unpatch_all=True):
        self.detached += 1
        self.model.to(self.offload_device)
        self.model.device = self.offload_device
        return self.model


class FakeLoadedModel:
    """`comfy.model_management.LoadedModel`: an entry of `current_loaded_models`."""

    def __init__(self, model):
        self.model = model

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        self.model.detach(unpatch_weights)
        return True


def fake_model_management(calls: dict[str, list]) -> types.ModuleType:
    """The memory functions of `comfy.model_management`, behaving like ComfyUI's for models it fully loads."""
    mm = types.ModuleType("comfy.model_management")
    mm.current_loaded_models = []

    def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None,
                        force_full_load=False):
        calls["load_models_gpu"].append((list(models), force_full_load))
        for patcher in models:
            patcher.load()
            listed = [m for m in mm.current_loaded_models if m.model is patcher]
            for entry in listed:
                mm.current_loaded_models.remove(entry)
            mm.current_loaded_models.insert(0, listed[0] if listed else FakeLoadedModel(patcher))

    def unload_all_models():
        while mm.current_loaded_models:
            mm.current_loaded_models.pop().model_unload()

    mm.load_models_gpu = load_models_gpu
    mm.unload_all_models = unload_all_models
    mm.free_memory = lambda n, device, keep_loaded=(): calls["free_memory"].append((n, device))
    mm.soft_empty_cache = lambda force=False: calls["soft_empty_cache"].append(force)
    return mm


@pytest.fixture
def fake_comfy(monkeypatch, tmp_path):
    """Stand-ins for the ComfyUI modules the adapter uses, recording what the pack does with them."""
    calls: dict[str, list] = {"progress": [], "free_memory": [], "soft_empty_cache": [], "load_models_gpu": [],
                              "patchers": []}
    folder_paths = types.ModuleType("folder_paths")
    folder_paths.models_dir = str(tmp_path / "models")
    folder_paths.folder_names_and_paths = {}

    def add_model_folder_path(key, path, is_default=False):
        folder_paths.folder_names_and_paths.setdefault(key, ([], set()))[0].append(path)

    folder_paths.add_model_folder_path = add_model_folder_path
    folder_paths.get_folder_paths = lambda key: list(folder_paths.folder_names_and_paths[key][0])

    class InterruptProcessingException(Exception):
        pass

    class ProgressBar:
        def __init__(self, total, node_id=None):
            self.total = total

        def update_absolute(self, value, total=None, preview=None):
            calls["progress"].append((value, total))

    class ModelPatcher(FakeModelPatcher):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            calls["patchers"].append(self)

    state = {"interrupt_after": None}
    mm = fake_model_management(calls)
    mm.InterruptProcessingException = InterruptProcessingException
    mm.processing_interrupted = lambda: state["interrupt_after"] is not None and \
        len(calls["progress"]) >= state["interrupt_after"]
    mm.get_torch_device = lambda: torch.device("cpu")
    mm.intermediate_device = lambda: torch.device("cpu")
    utils = types.ModuleType("comfy.utils")
    utils.ProgressBar = ProgressBar
    model_patcher = types.ModuleType("comfy.model_patcher")
    model_patcher.ModelPatcher = ModelPatcher
    comfy = types.ModuleType("comfy")
    comfy.model_management, comfy.utils, comfy.model_patcher = mm, utils, model_patcher
    for name, module in {"folder_paths": folder_paths, "comfy": comfy, "comfy.model_management": mm,
                         "comfy.utils": utils, "comfy.model_patcher": model_patcher}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return types.SimpleNamespace(folder_paths=folder_paths, mm=mm, calls=calls, state=state)



@pytest.fixture(scope="module")
def portrait():
    return torch.from_numpy(skdata.astronaut()).float()[None] / 255  # IMAGE [1, 512, 512, 3]


@pytest.fixture(scope="module")
def speech():
    """About half a second of real speech at 44.1 kHz stereo: 13 frames, two clips of 8."""
    from emocast_pack.emocast_core.testing.speech import synthesize_speech

    wave = torch.from_numpy(synthesize_speech("Hello there.", sample_rate=44100))[: 22050]
    stereo = torch.stack([wave, 0.5 * wave])
    return {"waveform": stereo[None], "sample_rate": 44100}
