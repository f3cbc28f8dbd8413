"""Shared test helpers: the repository's paths and importing the pack as ComfyUI does."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Everything the tests read lives in the repository (see tests/fixtures/README.md).
FIXTURES = ROOT / "tests" / "fixtures"
# The core node types the shipped workflows use, as ComfyUI 0.3.64 reports them in /object_info.
CORE_NODE_SPEC = FIXTURES / "comfyui" / "object_info_core_subset.json"
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
