"""Layouts of weights files (tensor names and shapes) and reports of how two layouts differ.

A report groups the offending keys by pattern (``down_blocks.{0-2}.attentions.{0,1}...``) instead of listing
thousands of names. Pure functions over names and shapes: no file access, no model.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch


class TensorSpec(NamedTuple):
    """What a file declares about one tensor, without its data."""

    shape: tuple[int, ...]
    dtype: str  # torch name: "float16", "bfloat16", "float32", ...


Layout = dict[str, TensorSpec]


@dataclass
class LayoutReport:
    """Difference between the tensors a model expects and those a file holds."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    expected_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    actual_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_layout(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> LayoutReport:
    """Compare two ``{name: shape}`` maps (values may be shapes, :class:`TensorSpec` or tensors)."""
    exp = {name: _shape_of(v) for name, v in expected.items()}
    act = {name: _shape_of(v) for name, v in actual.items()}
    return LayoutReport(
        missing=[n for n in exp if n not in act],
        unexpected=[n for n in act if n not in exp],
        mismatched=[(n, exp[n], act[n]) for n in exp if n in act and exp[n] != act[n]],
        expected_shapes=exp,
        actual_shapes=act,
    )


@dataclass
class KeyGroup:
    """Keys that differ only in their numeric path components, e.g. ``down_blocks.{0-2}.attentions.{0,1}``."""

    pattern: str
    count: int
    details: list[str] = field(default_factory=list)  # distinct shape descriptions, in key order


def group_keys(keys: Iterable[str], details: Mapping[str, str] | None = None,
               depth: int | None = None) -> list[KeyGroup]:
    """Group keys whose paths differ only in numbers. `depth` merges further: each key is cut after its
    `depth`-th named (non-numeric) component and the indices right after it (marked ``.*``), so that
    ``mid_block.motion_modules.0`` and ``down_blocks.1.motion_modules.0`` are cut at the same level.
    Groups keep the order of their first key; cut groups carry no shape details."""
    slots: dict[tuple[str, ...], list[set[int]]] = {}
    counts: Counter[tuple[str, ...]] = Counter()
    shapes: dict[tuple[str, ...], list[str]] = {}
    for key in keys:
        parts = _cut(key.split("."), depth)
        pattern = tuple("#" if p.isdigit() else p for p in parts)
        numbers = [int(p) for p in parts if p.isdigit()]
        if pattern not in slots:
            slots[pattern] = [set() for _ in numbers]
            shapes[pattern] = []
        for slot, number in zip(slots[pattern], numbers):
            slot.add(number)
        counts[pattern] += 1
        if details is not None and key in details and parts[-1] != "*" and details[key] not in shapes[pattern]:
            shapes[pattern].append(details[key])
    groups = []
    for pattern, index_sets in slots.items():
        rendered = iter(_format_indices(sorted(s)) for s in index_sets)
        text = ".".join(next(rendered) if p == "#" else p for p in pattern)
        groups.append(KeyGroup(text, counts[pattern], shapes[pattern]))
    return groups


def group_keys_within(keys: Sequence[str], limit: int,
                      details: Mapping[str, str] | None = None) -> list[KeyGroup]:
    """Like :func:`group_keys`, but merge into coarser groups until at most `limit` remain."""
    groups = group_keys(keys, details)
    depth = max((_named_depth(k) for k in keys), default=1) - 1
    while len(groups) > limit and depth >= 1:
        groups = group_keys(keys, details, depth)
        depth -= 1
    return groups


def _named_depth(key: str) -> int:
    return sum(not p.isdigit() for p in key.split("."))


def _cut(parts: list[str], depth: int | None) -> list[str]:
    if depth is None or sum(not p.isdigit() for p in parts) <= depth:
        return parts
    named = 0
    for i, part in enumerate(parts):
        if not part.isdigit():
            if named == depth:
                return parts[:i] + ["*"]
            named += 1
    return parts


def format_report(report: LayoutReport, limit: int = 12) -> str:
    """Human-readable summary of a :class:`LayoutReport`: at most `limit` pattern lines per section."""
    if report.ok:
        return "layout OK"
    sections = []
    exp, act = report.expected_shapes, report.actual_shapes
    if report.missing:
        sections.append(_format_section("missing", report.missing, limit,
                                        {k: _fmt_shape(exp[k]) for k in report.missing if k in exp}))
    if report.unexpected:
        sections.append(_format_section("unexpected", report.unexpected, limit,
                                        {k: _fmt_shape(act[k]) for k in report.unexpected if k in act}))
    if report.mismatched:
        names = [name for name, _, _ in report.mismatched]
        details = {n: f"expected {_fmt_shape(e)}, got {_fmt_shape(g)}" for n, e, g in report.mismatched}
        sections.append(_format_section("wrong shape for", names, limit, details))
    return "\n".join(sections)


def _format_section(title: str, keys: Sequence[str], limit: int, details: Mapping[str, str]) -> str:
    groups = group_keys_within(keys, limit, details)
    noun = "key" if len(keys) == 1 else "keys"
    plural = "pattern" if len(groups) == 1 else "patterns"
    lines = [f"{title} {len(keys)} {noun} in {len(groups)} {plural}:"]
    for group in groups[:limit]:
        shown = "; ".join(group.details[:3]) + ("; ..." if len(group.details) > 3 else "")
        lines.append(f"  {group.pattern}  x{group.count}" + (f"  {shown}" if shown else ""))
    if len(groups) > limit:
        rest = sum(g.count for g in groups[limit:])
        lines.append(f"  ... and {len(groups) - limit} more patterns ({rest} keys)")
    return "\n".join(lines)


def _shape_of(value: Any) -> tuple[int, ...]:
    if isinstance(value, TensorSpec):
        return value.shape
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(int(v) for v in value)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _format_indices(values: list[int]) -> str:
    """[3] -> "3"; [0, 1] -> "{0,1}"; [0, 1, 2] -> "{0-2}"; [0, 2, 3, 4] -> "{0,2-4}"."""
    if len(values) == 1:
        return str(values[0])
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = []
    for run in runs:
        parts.extend([f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(v) for v in run])
    return "{" + ",".join(parts) + "}"
