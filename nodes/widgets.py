"""Queue-time checks of the nodes' widget values (ComfyUI's `VALIDATE_INPUTS`).

ComfyUI checks a widget against its declared min / max, but skips that check for every input a node's
`VALIDATE_INPUTS` names, and lets NaN through (NaN compares false with any bound). So a node that checks its
values with the library also checks them against its own declared bounds here. Linked inputs arrive as None
and are checked when they run.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any


def validate(node: type, values: Mapping[str, Any], check: Callable[[], None] = lambda: None) -> bool | str:
    """True, or the message ComfyUI shows: the first value outside its widget's bounds, else what `check`
    (a library validation that raises ValueError) says."""
    spec = {**node.INPUT_TYPES().get("required", {}), **node.INPUT_TYPES().get("optional", {})}
    for name, value in values.items():
        kind, options = spec[name][0], (spec[name][1] if len(spec[name]) > 1 else {})
        if value is None or kind not in ("INT", "FLOAT"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{name} must be a finite number, got {value!r}"
        low, high = options.get("min"), options.get("max")
        if (low is not None and value < low) or (high is not None and value > high):
            return f"{name} must be between {low} and {high}, got {value}"
    try:
        check()
    except ValueError as exc:
        return str(exc)
    return True
