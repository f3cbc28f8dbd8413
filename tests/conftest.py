"""Shared test fixtures: where the reference material lives."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# CI clones the repository next to a copy of shared/, exactly as in a developer checkout.
SHARED = Path(os.environ.get("EMOCAST_SHARED", ROOT.parent / "shared"))
REFERENCE = SHARED / "reference"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not REFERENCE.is_dir():
        raise FileNotFoundError(f"reference material not found at {REFERENCE}; set EMOCAST_SHARED")
    return REFERENCE
