"""One torch part of `EmoCASTModels` in the form ComfyUI's `ModelPatcher` manages (imported when models load).

`ModelPatcher` keeps the weights' location in `model.device` and writes it on every load and unload, but diffusers
and transformers models expose `device` as a read-only property. The part is therefore held by a small module
with a plain `device` attribute. It holds the very module the library uses, so whatever ComfyUI moves is what
the library runs: there is never a second copy of the weights.
"""
from __future__ import annotations

import torch


def weight_devices(module: torch.nn.Module) -> set[torch.device]:
    """Every device holding a parameter or buffer of `module`."""
    return {t.device for t in (*module.parameters(), *module.buffers())}


class EmoCASTModelPart(torch.nn.Module):
    """`module` registered under `name`, with the settable `device` that `ModelPatcher` expects."""

    def __init__(self, name: str, module: torch.nn.Module) -> None:
        super().__init__()
        devices = weight_devices(module)
        if len(devices) != 1:
            raise ValueError(f"the EmoCAST part {name!r} must have its weights on one device to be handed to "
                             f"ComfyUI, found {sorted(map(str, devices)) or 'no weights'}")
        self.add_module(name, module)
        self.part = name
        self.device = devices.pop()

    def extra_repr(self) -> str:
        return f"part={self.part!r}, device={self.device}"
