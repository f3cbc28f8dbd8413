"""Training configuration: one YAML file per stage, read into dataclasses with strict key checking.

`training/configs/stage1.yaml` and `stage2.yaml` carry the official EmoCAST values (docs/model.md §6).
Any value can be overridden from the command line with ``--set section.key=value`` (YAML syntax).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class ModelSection:
    config: str = "full"  # "full", "tiny" or a path to a model config.json
    sd15_unet: str | None = None  # diffusers SD1.5 unet/ folder (or the whole SD1.5 folder): both UNets' init
    motion_module: str | None = None  # stage 2: AnimateDiff mm_sd_v15_v2.ckpt
    stage1_checkpoint: str | None = None  # stage 2: stage-1 result, loaded non-strictly
    init_checkpoint: str | None = None  # a whole EmoCAST checkpoint to continue from (later phases)
    vae: str = "./pretrained_models/sd-vae-ft-mse"
    clip: str = "./pretrained_models/clip-vit-large-patch14"


@dataclass
class DataSection:
    roots: list[str] = field(default_factory=list)  # prepared dataset folders (one clip folder per video)
    sources: list[str] = field(default_factory=list)  # keep only clips whose meta `source` is listed (empty: all)
    batch_size: int = 2
    size: int = 512
    num_workers: int = 4
    sample_margin: int = 30  # stage 1: frames between reference and target within one video
    emotion_aware: bool = True  # stage 1: reference from a neutral video of the same identity
    frames: int = 14  # stage 2: n_sample_frames
    motion_frames: int = 2  # stage 2: n_motion_frames
    audio_margin: int = 2  # stage 2: audio window frames on each side


@dataclass
class SolverSection:
    max_train_steps: int = 30000
    learning_rate: float = 1.0e-5
    lr_warmup_steps: int = 1  # linear warm-up, then constant
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1.0e-2
    adam_epsilon: float = 1.0e-8
    use_8bit_adam: bool = False  # bitsandbytes AdamW8bit on CUDA when installed
    max_grad_norm: float = 1.0
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # "no" (fp32), "fp16" (autocast + grad scaler) or "bf16" (autocast)
    gradient_checkpointing: bool = False  # denoising UNet layers recomputed in backward


@dataclass
class DiffusionSection:
    noise_offset: float = 0.05
    snr_gamma: float | None = 5.0  # None: unweighted MSE


@dataclass
class DropoutSection:
    uncond: float = 0.1  # stage 1: zero identity, no reference (and empty text, see uncond_text)
    uncond_text: bool = True  # stage 1: unconditional samples get the empty prompt, as inference does
    uncond_face_locator: bool = False  # stage 1: also zero the FaceLocator features (official: kept)
    image: float = 0.05  # stage 2: no reference attention
    audio: float = 0.05  # stage 2: zero audio tokens
    start: float = 0.05  # stage 2: motion frames zeroed (mid-grey) before the VAE, as at a video's start


@dataclass
class OutputSection:
    dir: str = "./exp_output/stage1"
    checkpointing_steps: int = 500
    save_pth: bool = True  # also write net-<step>.pth (torch.save of the same state dict)
    log_every: int = 10
    resume: bool = True  # continue from the latest checkpoint + training state in `dir`, if any


@dataclass
class StageConfig:
    stage: int
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    solver: SolverSection = field(default_factory=SolverSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    dropout: DropoutSection = field(default_factory=DropoutSection)
    output: OutputSection = field(default_factory=OutputSection)
    seed: int = 42
    device: str = "auto"

    def validate(self) -> None:
        if self.stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2, got {self.stage!r}")
        d, s = self.data, self.solver
        if not d.roots:
            raise ValueError("data.roots is empty: list the prepared dataset folders to train on")
        for name in ("batch_size", "num_workers", "frames", "motion_frames", "audio_margin", "sample_margin"):
            if getattr(d, name) < (0 if name in ("num_workers", "motion_frames", "audio_margin",
                                                  "sample_margin") else 1):
                raise ValueError(f"data.{name} is {getattr(d, name)}, which is out of range")
        if d.size < 64 or d.size % 64:
            raise ValueError(f"data.size must be a positive multiple of 64, got {d.size}")
        if s.max_train_steps < 1 or s.gradient_accumulation_steps < 1 or s.lr_warmup_steps < 0:
            raise ValueError("solver.max_train_steps and gradient_accumulation_steps must be >= 1, "
                             "lr_warmup_steps >= 0")
        if s.learning_rate <= 0 or s.max_grad_norm <= 0:
            raise ValueError("solver.learning_rate and max_grad_norm must be positive")
        if s.mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"solver.mixed_precision must be one of {MIXED_PRECISION}, got {s.mixed_precision!r}")
        for name in ("uncond", "image", "audio", "start"):
            p = getattr(self.dropout, name)
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout.{name} must be a probability in [0, 1], got {p}")
        if self.output.checkpointing_steps < 1 or self.output.log_every < 1:
            raise ValueError("output.checkpointing_steps and output.log_every must be >= 1")
        if self.stage == 1 and (self.model.stage1_checkpoint or self.model.motion_module):
            raise ValueError("model.stage1_checkpoint / model.motion_module belong to stage 2, not stage 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- loading -------------------------------------------------------------------------------------

def read_yaml(path: Path, what: str) -> Any:
    """The parsed YAML file; errors say which file and what is wrong with it."""
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path} is not valid YAML: {exc}") from exc


def load_stage_config(path: str | Path, overrides: Sequence[str] = ()) -> StageConfig:
    """Read a stage YAML file, apply ``section.key=value`` overrides, check and return it."""
    path = Path(path)
    data = read_yaml(path, "training config")
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(dict(data), overrides), where=str(path))


def config_from_dict(data: Mapping[str, Any], where: str = "training config") -> StageConfig:
    config = build_dataclass(StageConfig, data, where)
    config.validate()
    return config


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each ``a.b.c=value`` set (the value is read as YAML: 10, 1e-4, true, null, [a, b])."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like section.key=value")
        parts = key.strip().split(".")
        node = data
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def build_dataclass(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """A (nested) config dataclass from a mapping: unknown keys and wrongly typed values are errors."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys are {sorted(names)}")
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = build_dataclass(hint, value or {}, f"{where}: {name}")
        else:
            values[name] = _coerce(value, hint, f"{where}: {name}")
    return cls(**values)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check a YAML scalar against a field type; YAML 1.1 reads '1e-5' as a string, so floats are parsed."""
    args = typing.get_args(hint)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"{where} must not be empty")
    if type(None) in args:
        hint = next(a for a in args if a is not type(None))
    origin = typing.get_origin(hint)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        item = typing.get_args(hint)[0]
        if dataclasses.is_dataclass(item):
            return [build_dataclass(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return [_coerce(v, item, where) for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool):
            raise ValueError(f"{where} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    if hint is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ValueError(f"{where} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"{where}: unsupported config field type {hint!r}")
