"""Progressive functional training (paper §3.4.2): stage 2 run as a sequence of data phases, each
continuing from the previous phase's checkpoint.

The paper's three phases are "generalisation" (all ETTH sources, in-the-wild emotional videos included),
"emotion refinement" (MEAD + HDTF) and "lip-sync specialisation" (HDTF). A phase is a change of the
training data (`roots` and / or a filter on the clips' `source`) and a resume of the weights
(docs/model.md §6.7); the optimiser starts afresh in every phase. The paper gives no step counts.

Rerunning the same command after an interruption skips the finished phases (their output folder holds
the final checkpoint) and resumes the interrupted one from its last checkpoint (:mod:`training.resume`).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


from .config import StageConfig, build_dataclass, load_stage_config, read_yaml
from .runner import TrainingResult, finished_run, train

logger = logging.getLogger(__name__)

_PHASE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class Phase:
    name: str
    max_train_steps: int
    roots: list[str] = field(default_factory=list)  # empty: the base config's data.roots
    sources: list[str] = field(default_factory=list)  # empty: every clip of the roots


@dataclass
class ProgressiveConfig:
    base: str  # a stage-2 YAML file: everything except the data and the step count of each phase
    output_dir: str
    phases: list[Phase] = field(default_factory=list)

    def validate(self) -> None:
        if not self.phases:
            raise ValueError("progressive training needs at least one phase")
        names = [p.name for p in self.phases]
        for phase in self.phases:
            if not _PHASE_NAME.match(phase.name):
                raise ValueError(f"phase name {phase.name!r} must be letters, digits, '_', '-' or '.'")
            if phase.max_train_steps < 1:
                raise ValueError(f"phase {phase.name}: max_train_steps must be >= 1")
        if len(set(names)) != len(names):
            raise ValueError(f"phase names must be unique, got {names}")


def load_progressive_config(path: str | Path) -> ProgressiveConfig:
    path = Path(path)
    data = read_yaml(path, "progressive config")
    config = build_dataclass(ProgressiveConfig, data or {}, str(path))
    config.validate()
    return config


def phase_configs(config: ProgressiveConfig, overrides: Sequence[str] = ()) -> list[StageConfig]:
    """The stage-2 config of every phase: the base file + `overrides` + the phase's data and steps,
    written to `<output_dir>/<index>-<name>`. Phase k > 1 continues from phase k-1 (set by the runner)."""
    configs = []
    for index, phase in enumerate(config.phases, start=1):
        phase_overrides = [*overrides, f"solver.max_train_steps={phase.max_train_steps}",
                           f"output.dir={json.dumps(str(Path(config.output_dir) / f'{index}-{phase.name}'))}"]
        if phase.roots:
            phase_overrides.append(f"data.roots={json.dumps(phase.roots)}")
        if phase.sources:
            phase_overrides.append(f"data.sources={json.dumps(phase.sources)}")
        stage = load_stage_config(config.base, phase_overrides)
        if stage.stage != 2:
            raise ValueError(f"{config.base} is a stage-{stage.stage} config; progressive phases run stage 2")
        configs.append(stage)
    return configs


def run_progressive(config: ProgressiveConfig, overrides: Sequence[str] = ()) -> list[TrainingResult]:
    """Run the phases in order; each starts from the previous phase's last checkpoint. Finished phases
    are skipped, an interrupted one resumes."""
    results: list[TrainingResult] = []
    for phase, stage in zip(config.phases, phase_configs(config, overrides)):
        if results:
            stage.model.init_checkpoint = str(results[-1].checkpoint)
        done = finished_run(stage)
        if done is not None:
            logger.info("phase %s: finished already (%s), skipped", phase.name, done.checkpoint)
            results.append(done)
            continue
        logger.info("phase %s: %d steps on %s%s, from %s", phase.name, stage.solver.max_train_steps,
                    stage.data.roots, f" (sources {stage.data.sources})" if stage.data.sources else "",
                    stage.model.init_checkpoint or stage.model.stage1_checkpoint or "the base initialisation")
        results.append(train(stage))
    return results
