"""Summaries of a weights file for `python -m emocast_core inspect`: tensors, elements and bytes per network."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Mapping

from ..models.net import PREFIXES
from .files import itemsize
from .layout import TensorSpec


@dataclass
class ModuleStats:
    tensors: int = 0
    elements: int = 0
    bytes: int = 0


@dataclass
class LayoutSummary:
    total: ModuleStats
    per_module: dict[str, ModuleStats]
    dtypes: Counter[str]


def summarize_layout(layout: Mapping[str, TensorSpec]) -> LayoutSummary:
    """Tensor, element and byte counts per top-level module, and how many tensors have each dtype."""
    total, per_module, dtypes = ModuleStats(), {}, Counter()
    for name, spec in layout.items():
        numel = math.prod(spec.shape)
        nbytes = numel * itemsize(spec.dtype)
        for stats in (total, per_module.setdefault(name.split(".", 1)[0], ModuleStats())):
            stats.tensors += 1
            stats.elements += numel
            stats.bytes += nbytes
        dtypes[spec.dtype] += 1
    order = {name: i for i, name in enumerate(PREFIXES)}
    per_module = dict(sorted(per_module.items(), key=lambda item: order.get(item[0], len(order))))
    return LayoutSummary(total, per_module, dtypes)


def format_summary(summary: LayoutSummary) -> str:
    lines = [f"{'module':<16}{'tensors':>9}{'elements':>16}{'MB':>11}"]
    for name, stats in [*summary.per_module.items(), ("total", summary.total)]:
        lines.append(f"{name:<16}{stats.tensors:>9}{stats.elements:>16,}{stats.bytes / 2**20:>11.1f}")
    lines.append("dtypes: " + ", ".join(f"{d} x{n}" for d, n in summary.dtypes.most_common()))
    return "\n".join(lines)
