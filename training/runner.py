"""The training loop of one stage: models, data, optimiser, steps, logs and checkpoints.

Checkpoints are the whole `EmoCASTNet` state dict (the released `net.pth` layout) as
``net-<step>.safetensors`` with the model config in its metadata (what `emocast_core.checkpoints.load_net`
and `python -m emocast_core inspect` read), plus ``net-<step>.pth`` (`torch.save` of the same dict) when
`output.save_pth` is on. Single device, no distributed training.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from diffusers import AutoencoderKL
from torch.utils.data import DataLoader, Dataset

from emocast_core.checkpoints import (
    CheckpointError, compare_layout, init_from_pretrained, load_net, load_state_dict, save_safetensors,
)
from emocast_core.config import NetConfig
from emocast_core.emotion import EmotionTextEncoder
from emocast_core.models.net import EmoCASTNet, build_net
from emocast_core.pipeline import resolve_device
from emocast_core.scheduler import make_training_scheduler

from .config import StageConfig
from .data.datasets import Stage1Dataset, Stage2Dataset
from .data.metadata import PreparedClip, discover_clips
from .stages import (
    STAGE1_MODULES, Stage1Settings, Stage2Settings, StepResult, TrainingModels, configure_trainable,
    in_frame_module, stage1_net_config, stage1_step, stage2_step,
)

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"
_AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_net_config(spec: str) -> NetConfig:
    """The model config named by `model.config`: "full", "tiny" or a path to a config.json."""
    if spec in ("full", "tiny"):
        return NetConfig.builtin(spec)
    return NetConfig.from_json(spec)


# ---- models --------------------------------------------------------------------------------------

def load_stage1_weights(net: EmoCASTNet, path: str | Path) -> int:
    """Load a stage-1 checkpoint into a stage-2 network, non-strictly: reference UNet, denoising UNet,
    FaceLocator, face projection. Only motion / audio modules may be absent from the file (they are
    new in stage 2); anything else missing, or of another shape, is an error. Returns the tensors loaded."""
    path = Path(path)
    state = {k: v for k, v in load_state_dict(path).items() if k.split(".", 1)[0] in STAGE1_MODULES}
    own = net.state_dict()
    report = compare_layout({k: own[k] for k in own if k.split(".", 1)[0] in STAGE1_MODULES}, state)
    new_in_stage2 = [k for k in report.missing if in_frame_module(k)]
    missing = [k for k in report.missing if not in_frame_module(k)]
    if report.unexpected or report.mismatched or missing:
        raise CheckpointError(path, "is not a stage-1 checkpoint of this model config",
                              dataclasses.replace(report, missing=missing))
    net.load_state_dict(state, strict=False)
    logger.info("stage 1 weights: %d tensors from %s; %d motion/audio tensors keep their initialisation",
                len(state), path, len(new_in_stage2))
    return len(state)


def build_net_for(config: StageConfig, device: torch.device) -> EmoCASTNet:
    net_config = resolve_net_config(config.model.config)
    if config.stage == 1:
        net_config = stage1_net_config(net_config)
    m = config.model
    if m.init_checkpoint:
        net = load_net(m.init_checkpoint, net_config, device=device)
        logger.info("continuing from %s", m.init_checkpoint)
        return net
    if m.sd15_unet:
        net = init_from_pretrained(net_config, m.sd15_unet, m.motion_module if config.stage == 2 else None,
                                   device=device)
    else:
        if m.motion_module:
            raise ValueError("model.motion_module needs model.sd15_unet (the motion modules go into the SD1.5 UNet)")
        logger.warning("no model.sd15_unet given: the UNets start from random weights (tests / smoke runs only)")
        net = build_net(net_config, device=device)
    if config.stage == 2:
        if m.stage1_checkpoint:
            load_stage1_weights(net, m.stage1_checkpoint)
        else:
            logger.warning("stage 2 without model.stage1_checkpoint: the spatial layers are not trained")
    return net


def build_models(config: StageConfig, device: torch.device) -> TrainingModels:
    net = build_net_for(config, device)
    vae = AutoencoderKL.from_pretrained(config.model.vae, local_files_only=True).to(device)
    vae.requires_grad_(False).eval()
    text = EmotionTextEncoder.from_pretrained(config.model.clip, device=device)
    return TrainingModels(net, vae, text, make_training_scheduler())


# ---- data ----------------------------------------------------------------------------------------

def select_clips(config: StageConfig) -> list[PreparedClip]:
    """The clips under `data.roots`, restricted to `data.sources` when given (case-insensitive)."""
    clips = discover_clips(config.data.roots)
    if not config.data.sources:
        return clips
    wanted = {s.lower() for s in config.data.sources}
    kept = [c for c in clips if c.meta.source.lower() in wanted]
    if not kept:
        found = sorted({c.meta.source for c in clips})
        raise ValueError(f"no clip under {config.data.roots} has a source in {config.data.sources} "
                         f"(the clips' sources are {found})")
    return kept


def build_dataset(config: StageConfig, identity_dim: int = 512) -> Dataset:
    clips = select_clips(config)
    d = config.data
    if config.stage == 1:
        return Stage1Dataset(clips, d.size, d.sample_margin, d.emotion_aware, config.seed,
                             identity_dim=identity_dim)
    return Stage2Dataset(clips, d.size, d.frames, d.motion_frames, d.audio_margin, config.seed,
                         identity_dim=identity_dim)


def _batches(loader: DataLoader) -> Iterator[dict]:
    while True:
        yield from loader


# ---- optimiser -----------------------------------------------------------------------------------

def make_optimizer(params: list[torch.nn.Parameter], config: StageConfig,
                   device: torch.device) -> torch.optim.Optimizer:
    s = config.solver
    kwargs = dict(lr=s.learning_rate, betas=(s.adam_beta1, s.adam_beta2), weight_decay=s.adam_weight_decay,
                  eps=s.adam_epsilon)
    if s.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            logger.warning("solver.use_8bit_adam is on but bitsandbytes is not installed: using torch AdamW "
                           "(more optimizer memory); pip install bitsandbytes to get 8-bit AdamW")
        else:
            if device.type == "cuda":
                return bnb.optim.AdamW8bit(params, **kwargs)
            logger.warning("8-bit AdamW needs a CUDA device; using torch AdamW on %s", device)
    return torch.optim.AdamW(params, **kwargs)


def warmup_then_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps))


# ---- checkpoints ---------------------------------------------------------------------------------

def save_checkpoint(net: EmoCASTNet, out_dir: str | Path, step: int, stage: int, save_pth: bool = True) -> Path:
    """``net-<step>.safetensors`` (+ ``.pth``): the whole network state dict, config in the metadata."""
    out_dir = Path(out_dir)
    state = {k: v.detach().to("cpu") for k, v in net.state_dict().items()}
    metadata = {"emocast_config": json.dumps(net.config.to_dict()), "training_stage": str(stage),
                "training_step": str(step)}
    path = save_safetensors(state, out_dir / f"net-{step}.safetensors", metadata=metadata)
    if save_pth:
        torch.save(state, out_dir / f"net-{step}.pth")
    return path


# ---- the loop ------------------------------------------------------------------------------------

@dataclass
class TrainingResult:
    checkpoint: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    reference_fallbacks: int = 0  # stage 1: emotional targets paired within their own video


def stage_settings(config: StageConfig) -> Stage1Settings | Stage2Settings:
    d, f = config.diffusion, config.dropout
    if config.stage == 1:
        return Stage1Settings(f.uncond, f.uncond_text, f.uncond_face_locator, d.noise_offset, d.snr_gamma)
    return Stage2Settings(f.image, f.audio, f.start, d.noise_offset, d.snr_gamma)


def train(config: StageConfig, models: TrainingModels | None = None) -> TrainingResult:
    """Run one stage as configured; returns the last checkpoint (also written every `checkpointing_steps`)."""
    config.validate()
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    # data first: a wrong dataset path should fail before minutes of model loading
    identity_dim = (models.net.config if models else resolve_net_config(config.model.config)) \
        .face_projection.identity_dim
    dataset = build_dataset(config, identity_dim)
    batch_size = config.data.batch_size
    if len(dataset) < batch_size:
        raise ValueError(f"the dataset has {len(dataset)} clips, fewer than data.batch_size {batch_size}")
    models = models or build_models(config, device)
    net = models.net
    params = configure_trainable(net, config.stage)
    net.denoising_unet.gradient_checkpointing = config.solver.gradient_checkpointing
    net.train()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        num_workers=config.data.num_workers, persistent_workers=config.data.num_workers > 0,
                        generator=torch.Generator().manual_seed(config.seed))
    optimizer = make_optimizer(params, config, device)
    lr_schedule = warmup_then_constant(optimizer, config.solver.lr_warmup_steps)
    precision = config.solver.mixed_precision
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    settings = stage_settings(config)
    step_fn = stage1_step if config.stage == 1 else stage2_step
    generator = torch.Generator(device).manual_seed(config.seed)

    out_dir = Path(config.output.dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False), encoding="utf-8")
    net.config.to_json(out_dir / "config.json")
    logger.info("stage %d: %d clips, %d trainable tensors (%.1f M parameters), %d steps on %s",
                config.stage, len(dataset), len(params), sum(p.numel() for p in params) / 1e6,
                config.solver.max_train_steps, device)

    result = TrainingResult(checkpoint=out_dir, steps=0)
    batches = _batches(loader)
    accumulation = config.solver.gradient_accumulation_steps
    started = time.monotonic()
    with (out_dir / LOG_FILE).open("a", encoding="utf-8") as log:
        for step in range(1, config.solver.max_train_steps + 1):
            loss_sum = 0.0
            for _ in range(accumulation):
                batch = next(batches)
                step_result = _forward(step_fn, models, batch, settings, generator, device, precision)
                scaler.scale(step_result.loss / accumulation).backward()
                loss_sum += float(step_result.loss.detach()) / accumulation
                if config.stage == 1:
                    result.reference_fallbacks += int(torch.as_tensor(batch["fallback"]).sum())
            if not math.isfinite(loss_sum) and not scaler.is_enabled():
                raise RuntimeError(f"stage {config.stage}: the loss is {loss_sum} at step {step}; lower "
                                   "solver.learning_rate or use mixed_precision 'no'")
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.solver.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            result.losses.append(loss_sum)
            result.steps = step
            record = {"step": step, "loss": loss_sum, "grad_norm": float(grad_norm),
                      "lr": lr_schedule.get_last_lr()[0], "seconds": round(time.monotonic() - started, 2),
                      "dropouts": step_result.dropouts.counts(), "fallbacks": result.reference_fallbacks}
            log.write(json.dumps(record) + "\n")
            log.flush()
            if step % config.output.log_every == 0 or step == 1:
                logger.info("stage %d step %d/%d: loss %.5f, grad norm %.3f", config.stage, step,
                            config.solver.max_train_steps, loss_sum, float(grad_norm))
            if step % config.output.checkpointing_steps == 0 or step == config.solver.max_train_steps:
                result.checkpoint = save_checkpoint(net, out_dir, step, config.stage, config.output.save_pth)
                logger.info("wrote %s", result.checkpoint)
    if config.stage == 1:
        logger.info("emotion-aware sampling: %d reference frame(s) came from the target's own video for lack "
                    "of a neutral video of the identity", result.reference_fallbacks)
    return result


StepFn = Callable[[TrainingModels, dict, Any, torch.Generator], StepResult]


def _forward(step_fn: StepFn, models: TrainingModels, batch: dict, settings: Stage1Settings | Stage2Settings,
             generator: torch.Generator, device: torch.device, precision: str) -> StepResult:
    if precision == "no":
        return step_fn(models, batch, settings, generator)
    with torch.autocast(device.type, dtype=_AUTOCAST_DTYPES[precision]):
        return step_fn(models, batch, settings, generator)
