"""The one place that talks to ComfyUI: model folders, progress, interruption, device and memory.

ComfyUI's modules (`folder_paths`, `comfy.utils`, `comfy.model_management`, `comfy.model_patcher`) are
imported when a function needs them, never at import time, and every function has a plain fallback for
running without ComfyUI (the tests, scripts): no registered folders, no progress bar, never interrupted,
torch's own devices, no memory manager (`manage_models` returns None; `load_on_device` acts only on the
patchers it makes).

Memory: under ComfyUI every torch part of the loaded models (networks, VAE, text encoder, wav2vec2) is handed
to ComfyUI's memory manager as a `ModelPatcher`, so ComfyUI loads, evicts and unloads the weights like those of
its own models; the nodes ask for the parts they need before each use (`load_on_device`).

Model folders: ComfyUI's `models/emocast/` (registered here under the key ``emocast``, so
`extra_model_paths.yaml` can add more locations under that key) plus every folder listed in the
``EMOCAST_MODELS_DIR`` environment variable (``os.pathsep``-separated; the only source without ComfyUI).
"""
from __future__ import annotations

import gc
import importlib
import logging
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

log = logging.getLogger("emocast.nodes")

MODEL_FOLDER_KEY = "emocast"
MODELS_DIR_ENV = "EMOCAST_MODELS_DIR"


def _comfy_module(name: str) -> ModuleType | None:
    """A ComfyUI module, or None when ComfyUI is not running (only a missing module counts as absent)."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is not None and (name == err.name or name.startswith(err.name + ".")):
            return None
        raise


def register_model_folder() -> Path | None:
    """Register `<ComfyUI models>/emocast` under the `emocast` key; returns it (None without ComfyUI)."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None:
        return None
    folder = Path(folder_paths.models_dir) / MODEL_FOLDER_KEY
    registered = folder_paths.folder_names_and_paths.get(MODEL_FOLDER_KEY, ([], set()))[0]
    if str(folder) not in registered:  # older ComfyUI appends duplicates
        folder_paths.add_model_folder_path(MODEL_FOLDER_KEY, str(folder))
    return folder


def model_roots() -> list[Path]:
    """Every folder searched for EmoCAST models, in priority order (existing or not)."""
    roots: list[Path] = []
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is not None and MODEL_FOLDER_KEY in folder_paths.folder_names_and_paths:
        roots += [Path(p) for p in folder_paths.get_folder_paths(MODEL_FOLDER_KEY)]
    roots += [Path(p).expanduser() for p in os.environ.get(MODELS_DIR_ENV, "").split(os.pathsep) if p.strip()]
    unique: list[Path] = []
    for root in roots:
        if root not in unique:
            unique.append(root)
    return unique


def comfy_model_files(folder_key: str) -> list[str]:
    """The files ComfyUI lists for one of its model folders (``vae``, ``text_encoders``, ...); [] without
    ComfyUI or when that ComfyUI has no such folder."""
    folder_paths = _comfy_module("folder_paths")
    if folder_paths is None or folder_key not in folder_paths.folder_names_and_paths:
        return []
    return list(folder_paths.get_filename_list(folder_key))


def comfy_model_file(folder_key: str, name: str) -> Path:
    """The full path of a file listed by `comfy_model_files`, or an error saying where it was looked for."""
    folder_paths = _comfy_module("folder_paths")
    found = None
    if folder_paths is not None and folder_key in folder_paths.folder_names_and_paths:
        found = folder_paths.get_full_path(folder_key, name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is not in ComfyUI's models/{folder_key} folder"
                                f"{'' if folder_paths is not None else ' (ComfyUI is not running)'}; refresh the "
                                "page (R) to update the list")
    return Path(found)


def comfy_clip_tokenizer() -> Path | None:
    """The CLIP-L tokenizer folder ComfyUI ships (``comfy/sd1_tokenizer``); None without it."""
    comfy = _comfy_module("comfy")
    location = getattr(comfy, "__file__", None)
    if location is None:
        return None
    folder = Path(location).resolve().parent / "sd1_tokenizer"
    return folder if (folder / "vocab.json").is_file() else None


def make_progress(total: int) -> Callable[[int], None]:
    """A callback taking the number of steps done so far (ComfyUI's progress bar on the running node)."""
    utils = _comfy_module("comfy.utils")
    if utils is None:
        return lambda done: None
    bar = utils.ProgressBar(total)
    return lambda done: bar.update_absolute(done, total)


def interrupted() -> bool:
    """True once the user pressed Cancel in ComfyUI (never without ComfyUI)."""
    mm = _comfy_module("comfy.model_management")
    return bool(mm is not None and mm.processing_interrupted())


def raise_cancelled(error: BaseException) -> NoReturn:
    """Re-raise a library cancellation the way the host expects: ComfyUI's interrupt (no error dialog)."""
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        raise mm.InterruptProcessingException() from error
    raise error


def compute_device() -> "torch.device | None":
    """ComfyUI's compute device (respects --cpu etc.); None without ComfyUI (the library then picks)."""
    mm = _comfy_module("comfy.model_management")
    return None if mm is None else mm.get_torch_device()


def make_room(num_bytes: int, device: "torch.device") -> None:
    """Ask ComfyUI to unload its own models until `num_bytes` fit on `device` (no-op on the CPU)."""
    mm = _comfy_module("comfy.model_management")
    if mm is not None and device.type != "cpu":
        mm.free_memory(num_bytes, device)


def release_memory() -> None:
    """Give freed memory back (garbage-collect, then empty the accelerator's cache)."""
    gc.collect()
    mm = _comfy_module("comfy.model_management")
    if mm is not None:
        mm.soft_empty_cache()
        return
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def output_device() -> Any:
    """Where node outputs live (ComfyUI's intermediate device: the CPU unless --gpu-only)."""
    mm = _comfy_module("comfy.model_management")
    return "cpu" if mm is None else mm.intermediate_device()


def manage_models(modules: Mapping[str, "torch.nn.Module"], load_device: "torch.device") -> dict[str, Any] | None:
    """One ComfyUI `ModelPatcher` per part (by part name), loading onto `load_device` and offloading to the CPU.

    None without ComfyUI. The offload device is the CPU even where ComfyUI keeps its own models on the GPU
    (--highvram, --gpu-only): the pack's model cache outlives ComfyUI's node cache, so weights parked on the
    GPU would stay there until the Unload Models node ran.
    """
    model_patcher = _comfy_module("comfy.model_patcher")
    if model_patcher is None:
        return None
    import torch

    from .model_parts import EmoCASTModelPart

    cpu = torch.device("cpu")
    return {name: model_patcher.ModelPatcher(EmoCASTModelPart(name, module), load_device=load_device,
                                             offload_device=cpu)
            for name, module in modules.items()}


def load_on_device(patchers: Collection[Any]) -> "torch.device":
    """Have ComfyUI put these parts on their load device, making room as it sees fit; returns that device.

    Plain torch layers cannot run split between two devices, hence `force_full_load`. ComfyUI can still leave
    them behind (--novram loads only its own `comfy.ops` layers); they are then moved over here, in full.
    """
    from .model_parts import weight_devices

    patchers = list(patchers)
    mm = _comfy_module("comfy.model_management")
    if mm is None or not patchers:
        raise ValueError("load_on_device takes the ModelPatchers made by manage_models under ComfyUI, got "
                         f"{len(patchers)} part(s) {'without' if mm is None else 'with'} ComfyUI")
    mm.load_models_gpu(patchers, force_full_load=True)
    target = patchers[0].load_device
    elsewhere = set().union(*(weight_devices(p.model) for p in patchers)) - {target}
    if elsewhere:
        log.warning("ComfyUI left EmoCAST weights on %s; moving them all to %s, since these layers cannot run "
                    "split between devices", ", ".join(sorted(map(str, elsewhere))), target)
        for patcher in patchers:
            patcher.model.to(target)
            patcher.model.device = target
    return target


def unload_models(patchers: Collection[Any]) -> None:
    """Move these parts back to the CPU and take them off ComfyUI's list of loaded models."""
    mm = _comfy_module("comfy.model_management")
    if mm is None:
        return
    remaining = list(patchers)
    loaded = mm.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if any(loaded[i].model is p for p in remaining):
            entry = loaded.pop(i)
            remaining = [p for p in remaining if p is not entry.model]
            entry.model_unload()
    for patcher in remaining:  # not listed (never loaded, or already unloaded by ComfyUI): a no-op move at most
        patcher.detach()
