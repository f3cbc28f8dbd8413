"""Shared test fixtures: where the reference material lives."""
from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI clones the repository next to a copy of shared/, exactly as in a developer checkout.
SHARED = Path(os.environ.get("EMOCAST_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"
PACK = "emocast_pack"


def load_pack(name: str = PACK) -> types.ModuleType:
    """Import the repository root as a package from its file path, as ComfyUI's custom-node loader does."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "__init__.py", submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        raise FileNotFoundError(f"reference material not found at {REFERENCE}; set EMOCAST_SHARED")
    return REFERENCE
