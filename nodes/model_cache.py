"""Loaded EmoCAST models, kept between runs and released on request.

Nodes pass a `ModelHandle` (the `EMOCAST_MODEL` socket value), not the models themselves: ComfyUI keeps
node outputs in its own cache, so if the models travelled through the graph, releasing them here would
not free anything. The handle names what to load; `ModelHandle.models()` loads it on first use and after
a release.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import comfy_adapter

if TYPE_CHECKING:
    from ..emocast_core.pipeline import EmoCASTModels

log = logging.getLogger("emocast.nodes")


@dataclass(frozen=True)
class LoadSpec:
    """What to load, and the cache key: the same file at another precision or device is another entry."""

    net: Path  # the network file; the other model folders sit beside it
    precision: str = "auto"  # auto / fp32 / fp16 / bf16
    device: str = "auto"  # auto (ComfyUI's device, else CUDA when available) / cpu / cuda
    offload: bool = False  # keep the weights on the CPU and move each part to the device only while it runs


def _folder_bytes(folder: Path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def load_models(spec: LoadSpec) -> "EmoCASTModels":
    """Read the model folder of `spec.net` onto the device (or onto the CPU when offloading)."""
    import torch

    from ..emocast_core.model_paths import ModelPaths
    from ..emocast_core.pipeline import EmoCASTModels, resolve_device, resolve_dtype

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the EmoCAST loader's device is 'cuda' but torch sees no CUDA GPU; choose 'auto' or 'cpu'")
    device = resolve_device(comfy_adapter.compute_device() if spec.device == "auto" else spec.device)
    dtype = resolve_dtype(spec.precision, device)
    paths = ModelPaths.resolve(spec.net.parent, net=spec.net)
    log.info("loading EmoCAST models from %s (%s on %s%s)", spec.net, str(dtype).removeprefix("torch."), device,
             ", offloaded to the CPU between uses" if spec.offload else "")
    if spec.offload:
        return replace(EmoCASTModels.load(paths, device="cpu", dtype=dtype), device=device)
    comfy_adapter.make_room(_folder_bytes(spec.net.parent), device)
    return EmoCASTModels.load(paths, device=device, dtype=dtype)


class ModelCache:
    """The loaded models by `LoadSpec`, at most `capacity` of them (loading one more drops the oldest)."""

    def __init__(self, capacity: int = 1, loader: Callable[[LoadSpec], "EmoCASTModels"] = load_models) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._load = loader
        self._entries: OrderedDict[LoadSpec, EmoCASTModels] = OrderedDict()

    def get(self, spec: LoadSpec) -> "EmoCASTModels":
        if spec in self._entries:
            self._entries.move_to_end(spec)
            return self._entries[spec]
        # Drop first, so that two models never sit in memory together.
        while len(self._entries) >= self.capacity:
            dropped, _ = self._entries.popitem(last=False)
            log.info("releasing EmoCAST models %s", dropped.net)
            comfy_adapter.release_memory()
        models = self._load(spec)
        self._entries[spec] = models
        return models

    def release(self) -> int:
        """Drop every loaded model; returns how many were dropped."""
        count = len(self._entries)
        self._entries.clear()
        comfy_adapter.release_memory()
        return count

    def __contains__(self, spec: object) -> bool:
        return spec in self._entries

    def __len__(self) -> int:
        return len(self._entries)


# One cache for the whole ComfyUI process: every loader node and every workflow tab shares it, so the same
# models are never loaded twice and the Unload node can free them wherever they were loaded.
MODEL_CACHE = ModelCache()


@dataclass(frozen=True)
class ModelHandle:
    """The value of an `EMOCAST_MODEL` socket."""

    spec: LoadSpec
    cache: ModelCache = field(default=MODEL_CACHE, compare=False, repr=False)

    def models(self) -> "EmoCASTModels":
        return self.cache.get(self.spec)

    @contextmanager
    def use(self, *parts: str) -> Iterator["EmoCASTModels"]:
        """The models with `parts` on the compute device for the duration (moved back when offloading)."""
        from ..emocast_core.conditioning import move_models, parameter_bytes

        models = self.models()
        if not self.spec.offload or models.device.type == "cpu" or not parts:
            yield models
            return
        comfy_adapter.make_room(parameter_bytes(models, parts), models.device)
        move_models(models, models.device, parts)
        try:
            yield models
        finally:
            move_models(models, "cpu", parts)
            comfy_adapter.release_memory()
