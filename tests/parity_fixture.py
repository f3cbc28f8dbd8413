"""The official-pipeline parity fixtures the parity, emotion and scheduler tests share.

By default the tests read the compact fixtures in tests/fixtures/parity_tiny and parity_full (their weights are
rebuilt by `emocast_core.testing.name_seeded`; see tests/fixtures/README.md). `EMOCAST_PARITY_FIXTURE=DIR` runs
the parity test on another folder instead: a compact one, or one with weight files (`net.safetensors` or the
official `net.pth`, `vae/` and `clip/` with weights), whose `expected.pt` may lack `intermediates`.

Import what a test module needs with `from parity_fixture import ...`.
"""
from __future__ import annotations

import ctypes
import gc
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import FIXTURES
from emocast_core.emotion import EmotionTextEncoder
from emocast_core.testing.name_seeded import ParityModels, load_parity_models, load_parity_text_encoder

PARITY_TINY = FIXTURES / "parity_tiny"  # tiny architecture: 128 px, 2 clips of 4 frames, 3 steps
PARITY_FULL = FIXTURES / "parity_full"  # the released (full-size) architecture: 128 px, 1 clip of 4 frames, 2 steps
ENV_VAR = "EMOCAST_PARITY_FIXTURE"


def env_folder() -> Path | None:
    """The folder named by $EMOCAST_PARITY_FIXTURE, if set (checked to hold inputs.pt)."""
    value = os.environ.get(ENV_VAR)
    if not value:
        return None
    folder = Path(value)
    if not (folder / "inputs.pt").is_file():
        raise FileNotFoundError(f"{ENV_VAR}={value}: no parity fixture there (inputs.pt is missing)")
    return folder


def parity_params(*, full: bool = True) -> list[Any]:
    """`pytest.param`s for the folders a parity test runs on: $EMOCAST_PARITY_FIXTURE alone when set, else the
    compact tiny fixture and (with `full`) the full-size one."""
    folder = env_folder()
    if folder is not None:
        return [pytest.param(folder, id=f"env-{folder.name}")]
    params = [pytest.param(PARITY_TINY, id="tiny")]
    if full:
        params.append(pytest.param(PARITY_FULL, id="full"))
    return params


def load_inputs(folder: Path) -> dict[str, Any]:
    """The official script's preprocessed inputs."""
    return torch.load(folder / "inputs.pt", weights_only=True)


def load_expected(folder: Path) -> dict[str, Any]:
    """The official outputs: `video` (3, F, H, W) in [0, 1], `timesteps`, and (if recorded) `intermediates`."""
    return torch.load(folder / "expected.pt", weights_only=True)


def intermediates(expected: dict[str, Any], folder: Path, name: str) -> list[Any]:
    """One recorded intermediate of the official run; skips the calling test when the fixture has none."""
    recorded = expected.get("intermediates") or {}
    if name not in recorded:
        pytest.skip(f"the parity fixture {folder} has no intermediates ({name!r} not in expected.pt)")
    return recorded[name]


def models(folder: Path, dtype: torch.dtype = torch.float32) -> ParityModels:
    """Net, VAE and text encoder of a fixture folder (compact: rebuilt from weights.json)."""
    return load_parity_models(folder, dtype)


def text_encoder(folder: Path = PARITY_TINY, dtype: torch.dtype = torch.float32) -> EmotionTextEncoder:
    """Only the emotion-text encoder of a fixture folder (the tiny compact fixture by default)."""
    return load_parity_text_encoder(folder, dtype)


def release_memory() -> None:
    """Collect garbage and hand freed heap memory back to the system (glibc keeps the pages of freed weights
    otherwise: about half of the full-size Net stays resident after it is deleted)."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
