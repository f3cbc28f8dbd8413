"""Resuming an interrupted stage: the training state written next to each checkpoint, and where to resume.

At every checkpoint step N a stage's output folder gets, besides ``net-N.safetensors`` (the weights):

* ``state-N.pt`` (main process): step, optimizer, learning-rate schedule, fp16 grad-scaler state and
  the fallback count;
* ``state-N.rank<R>.pt`` (every process R): its random state (the step generator that draws timesteps,
  noise, dropouts and VAE samples, torch's CPU / CUDA generators) and how many items its dataset drew.

A run resumes from the highest N for which both the net file and ``state-N.pt`` exist; every file is
written to a temporary name and renamed, so a run killed while saving leaves the previous point intact.
Older state files are deleted once a newer one is complete (the optimizer state is twice the trainable
weights); the net checkpoints are all kept. Everything is read back with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

_NET = re.compile(r"^net-(\d+)\.safetensors$")


@dataclass(frozen=True)
class ResumePoint:
    step: int
    checkpoint: Path  # net-<step>.safetensors
    state: Path  # state-<step>.pt

    def rank_state(self, rank: int) -> Path:
        return rank_state_path(self.state.parent, self.step, rank)


def state_path(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"state-{step}.pt"


def rank_state_path(out_dir: str | Path, step: int, rank: int) -> Path:
    return Path(out_dir) / f"state-{step}.rank{rank}.pt"


def find_resume_point(out_dir: str | Path) -> ResumePoint | None:
    """The latest step of `out_dir` with both a net checkpoint and a training state, or None."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    steps = sorted((int(m[1]) for p in out_dir.iterdir() if (m := _NET.match(p.name))), reverse=True)
    for step in steps:
        if state_path(out_dir, step).is_file():
            return ResumePoint(step, out_dir / f"net-{step}.safetensors", state_path(out_dir, step))
    return None


def _atomic_save(value: dict[str, Any], path: Path) -> None:
    partial = path.with_name(f".{path.name}.partial")
    torch.save(value, partial)
    os.replace(partial, path)


def save_shared_state(out_dir: str | Path, step: int, state: dict[str, Any]) -> Path:
    """The main process's part (optimizer, schedule, scaler, counters) of step `step`."""
    path = state_path(out_dir, step)
    _atomic_save({"step": step, **state}, path)
    return path


def save_process_state(out_dir: str | Path, step: int, rank: int, generator: torch.Generator,
                       dataset_draws: int) -> Path:
    """One process's random state and dataset position at step `step`."""
    state = {"step": step, "generator": generator.get_state(), "torch": torch.get_rng_state(),
             "dataset_draws": dataset_draws}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    path = rank_state_path(out_dir, step, rank)
    _atomic_save(state, path)
    return path


def _load(path: Path) -> dict[str, Any]:
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which one and what to do
        raise ValueError(f"cannot read the training state {path} ({exc}); delete it (and its net-*.safetensors) "
                         "to resume from the previous checkpoint, or set output.resume=false") from exc
    if not isinstance(value, dict):
        raise ValueError(f"{path} is not a training state (it holds a {type(value).__name__})")
    return value


def load_shared_state(point: ResumePoint) -> dict[str, Any]:
    state = _load(point.state)
    if state.get("step") != point.step:
        raise ValueError(f"{point.state} records step {state.get('step')}, but its name says {point.step}")
    return state


def restore_process_state(point: ResumePoint, rank: int, generator: torch.Generator) -> int | None:
    """Restore this process's random state; returns its dataset draw count, or None when the file is
    missing (another number of processes, or a run killed mid-save): then the random streams start afresh."""
    path = point.rank_state(rank)
    if not path.is_file():
        logger.warning("no random state %s: process %d continues with fresh random streams", path, rank)
        return None
    state = _load(path)
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    return int(state["dataset_draws"])


def prune_states(out_dir: str | Path, keep_step: int) -> None:
    """Delete the training states of steps other than `keep_step` (net checkpoints are kept)."""
    pattern = re.compile(r"^state-(\d+)(?:\.rank\d+)?\.pt$")
    for path in Path(out_dir).iterdir():
        match = pattern.match(path.name)
        if match and int(match[1]) != keep_step:
            path.unlink(missing_ok=True)


def truncate_log(path: str | Path, step: int) -> None:
    """Drop the log records after `step` (written by the interrupted run after its last checkpoint)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
