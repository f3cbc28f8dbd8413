"""Loaded EmoCAST models, kept between runs and released on request.

Nodes pass a `ModelHandle` (the `EMOCAST_MODEL` socket value), not the models themselves: ComfyUI keeps
node outputs in its own cache, so if the models travelled through the graph, releasing them here would
not free anything. The handle names what to load; `ModelHandle.models()` loads it on first use and after
a release.

Where the weights live:

* Under ComfyUI each torch part is wrapped in a `ModelPatcher` when the models load, and every node asks
  ComfyUI to load the parts it needs (`ModelHandle.use`). ComfyUI may move them back to the CPU whenever it
  needs room, on "Unload models" / POST /free, or after an out-of-memory error; the next use loads them again.
  The library then runs on the device ComfyUI put them on (`EmoCASTModels.device` follows it).
  Without offloading the models are loaded straight onto the device and registered with ComfyUI as loaded.
  With offloading they are loaded into CPU RAM and each node moves its parts back there when it is done.
* Without ComfyUI (tests, scripts) the models stay where they were loaded; with offloading each node moves
  its parts to the device and back itself.

Releasing an entry (the Unload Models node, or loading another model) also takes its parts off ComfyUI's list
and frees the CPU copy. ComfyUI's own unloading leaves that copy in this cache, ready for the next run.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import comfy_adapter

if TYPE_CHECKING:
    from ..emocast_core.runtime import EmoCASTModels

log = logging.getLogger("emocast.nodes")


@dataclass(frozen=True)
class LoadSpec:
    """What to load, and the cache key: the same file at another precision or device is another entry."""

    net: Path  # the network file; the other model folders sit beside it
    precision: str = "auto"  # auto / fp32 / fp16 (fp32 on the CPU) / bf16 / fp16-force
    device: str = "auto"  # auto (ComfyUI's device, else CUDA when available) / cpu / cuda
    offload: bool = False  # keep the weights on the CPU and move each part to the device only while it runs
    vae_file: Path | None = None  # single files (ComfyUI's own model folders) used instead of vae/, clip/, wav2vec2/
    clip_file: Path | None = None
    tokenizer_dir: Path | None = None  # the tokenizer for clip_file (None: the model folder's clip/)
    wav2vec2_file: Path | None = None


@dataclass
class LoadedModels:
    """A cache entry: the models and, under ComfyUI, the `ModelPatcher` of each torch part by part name."""

    models: "EmoCASTModels"
    patchers: dict[str, Any] | None = None  # None: ComfyUI does not manage these weights


def _folder_bytes(folder: Path) -> int:
    # followlinks: linked-in sub-folders (vae/ on another drive) count too; getsize follows file links
    return sum(os.path.getsize(os.path.join(root, f))
               for root, _, files in os.walk(folder, followlinks=True) for f in files)


def load_models(spec: LoadSpec) -> LoadedModels:
    """Read the model folder of `spec.net` onto the device (or into CPU RAM when offloading) and, under
    ComfyUI, hand the torch parts to its memory manager."""
    import torch

    from ..emocast_core.runtime import part_modules
    from ..emocast_core.model_paths import ModelPaths
    from ..emocast_core.runtime import EmoCASTModels, resolve_device, resolve_dtype

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the EmoCAST loader's device is 'cuda' but torch sees no CUDA GPU; choose 'auto' or 'cpu'")
    device = resolve_device(comfy_adapter.compute_device() if spec.device == "auto" else spec.device)
    if device.type == "cuda" and device.index is None:
        # ComfyUI matches loaded models to its device with ==, and cuda != cuda:0
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = resolve_dtype(spec.precision, device)
    paths = ModelPaths.resolve(spec.net.parent, net=spec.net, vae_file=spec.vae_file, clip_file=spec.clip_file,
                               tokenizer_dir=spec.tokenizer_dir, wav2vec2_file=spec.wav2vec2_file)
    log.info("loading EmoCAST models from %s (%s on %s%s)", spec.net, str(dtype).removeprefix("torch."), device,
             ", offloaded to the CPU between uses" if spec.offload else "")
    if spec.offload:
        models = replace(EmoCASTModels.load(paths, device="cpu", dtype=dtype), device=device)
    else:
        files = [f for f in (spec.vae_file, spec.clip_file, spec.wav2vec2_file) if f is not None]
        comfy_adapter.make_room(_folder_bytes(spec.net.parent) + sum(os.path.getsize(f) for f in files), device)
        models = EmoCASTModels.load(paths, device=device, dtype=dtype)
    patchers = comfy_adapter.manage_models(part_modules(models), device)
    if patchers is not None and not spec.offload:
        # Already on the device: tell ComfyUI, as it does for a checkpoint it loads straight to the GPU.
        models.device = comfy_adapter.load_on_device(patchers.values())
    return LoadedModels(models, patchers)


class ModelCache:
    """The loaded models by `LoadSpec`, at most `capacity` of them (loading one more drops the oldest)."""

    def __init__(self, capacity: int = 1, loader: Callable[[LoadSpec], LoadedModels] = load_models) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._load = loader
        self._entries: OrderedDict[LoadSpec, LoadedModels] = OrderedDict()

    def get(self, spec: LoadSpec) -> LoadedModels:
        if spec in self._entries:
            self._entries.move_to_end(spec)
            return self._entries[spec]
        # Drop first, so that two models never sit in memory together.
        while len(self._entries) >= self.capacity:
            dropped, entry = self._entries.popitem(last=False)
            log.info("releasing EmoCAST models %s", dropped.net)
            _unmanage(entry)
            del entry
            comfy_adapter.release_memory()
        loaded = self._load(spec)
        self._entries[spec] = loaded
        return loaded

    def release(self) -> int:
        """Drop every loaded model; returns how many were dropped."""
        count = len(self._entries)
        while self._entries:
            _unmanage(self._entries.popitem()[1])
        comfy_adapter.release_memory()
        return count

    def __contains__(self, spec: object) -> bool:
        return spec in self._entries

    def __len__(self) -> int:
        return len(self._entries)


def _unmanage(entry: LoadedModels) -> None:
    """Off ComfyUI's list, weights to the CPU: the GPU is freed even if something still holds the models."""
    if entry.patchers is not None:
        comfy_adapter.unload_models(entry.patchers.values())


# One cache for the whole ComfyUI process: every loader node and every workflow tab shares it, so the same
# models are never loaded twice and the Unload node can free them wherever they were loaded.
MODEL_CACHE = ModelCache()


@dataclass(frozen=True)
class ModelHandle:
    """The value of an `EMOCAST_MODEL` socket."""

    spec: LoadSpec
    cache: ModelCache = field(default=MODEL_CACHE, compare=False, repr=False)

    def models(self) -> "EmoCASTModels":
        return self.cache.get(self.spec).models

    @contextmanager
    def use(self, *parts: str) -> Iterator["EmoCASTModels"]:
        """The models with `parts` (see `MOVABLE_PARTS`) on the compute device for the duration."""
        loaded = self.cache.get(self.spec)
        if loaded.patchers is not None and parts:
            with _comfy_managed(loaded, parts, self.spec.offload) as models:
                yield models
        else:
            with _self_managed(loaded.models, parts, self.spec.offload) as models:
                yield models


@contextmanager
def _comfy_managed(loaded: LoadedModels, parts: tuple[str, ...], offload: bool) -> Iterator["EmoCASTModels"]:
    patchers = [loaded.patchers[p] for p in parts]
    # The library runs where ComfyUI put the weights, which may have been elsewhere since the last use.
    loaded.models.device = comfy_adapter.load_on_device(patchers)
    try:
        yield loaded.models
    finally:
        if offload:
            comfy_adapter.unload_models(patchers)
            comfy_adapter.release_memory()


@contextmanager
def _self_managed(models: "EmoCASTModels", parts: tuple[str, ...], offload: bool) -> Iterator["EmoCASTModels"]:
    """Without ComfyUI: resident models are used where they are; offloaded parts visit the device."""
    from ..emocast_core.runtime import move_models, parameter_bytes

    if not offload or models.device.type == "cpu" or not parts:
        yield models
        return
    comfy_adapter.make_room(parameter_bytes(models, parts), models.device)
    move_models(models, models.device, parts)
    try:
        yield models
    finally:
        move_models(models, "cpu", parts)
        comfy_adapter.release_memory()
