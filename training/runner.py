"""The training loop of one stage: models, data, optimiser, steps, logs and checkpoints.

Checkpoints are the whole `EmoCASTNet` state dict (the released `net.pth` layout) as
``net-<step>.safetensors`` with the model config in its metadata (what `emocast_core.checkpoints.load_net`
and `python -m emocast_core inspect` read), plus ``net-<step>.pth`` (`torch.save` of the same dict) when
`output.save_pth` is on; next to them, the optimizer and random state a restarted run resumes from
(:mod:`training.resume`).

The loop runs through `accelerate`: one process on one device (``python -m training ...``) or one process
per GPU (``accelerate launch --multi_gpu --num_processes N -m training ...``), with gradient accumulation
and mixed precision from the config; only the main process writes files.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DistributedDataParallelKwargs
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import GradientAccumulationPlugin
from diffusers import AutoencoderKL
from torch import nn
from torch.utils.data import DataLoader, Dataset

from emocast_core.checkpoints import (CONFIG_METADATA_KEY, CheckpointError, compare_layout, load_net, load_state_dict,
                                      save_safetensors)
from emocast_core.config import NetConfig
from emocast_core.emotion import EmotionTextEncoder
from emocast_core.models.net import EmoCASTNet, build_net
from emocast_core.scheduler import make_training_scheduler

from .config import StageConfig
from .data.datasets import EpochShuffleSampler, Stage1Dataset, Stage2Dataset
from .data.metadata import PreparedClip, discover_clips
from .init_weights import init_from_pretrained
from .resume import (
    ResumePoint, find_resume_point, load_shared_state, prune_states, restore_process_state, save_process_state,
    save_shared_state, truncate_log,
)
from .stages import (
    STAGE1_MODULES, Stage1Settings, Stage2Settings, StepResult, TrainingModels, configure_trainable,
    in_frame_module, stage1_net_config, stage1_step, stage2_step,
)

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


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


def _batches(loader: DataLoader, sampler: EpochShuffleSampler, accelerator: Accelerator,
             start: int) -> Iterator[dict]:
    """This process's batches forever, epoch after epoch, from its `start`-th batch on (a resumed run skips
    the batches it has trained on at the sampler level, without loading them)."""
    epoch, skip = divmod(start, len(loader))
    while True:
        sampler.set_epoch(epoch)
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        current.set_epoch(epoch)  # accelerate's loaders re-set the sampler's epoch from their own count
        yield from current
        epoch, skip = epoch + 1, 0


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
    metadata = {CONFIG_METADATA_KEY: json.dumps(net.config.to_dict()), "training_stage": str(stage),
                "training_step": str(step)}
    path = save_safetensors(state, out_dir / f"net-{step}.safetensors", metadata=metadata)
    if save_pth:
        torch.save(state, out_dir / f"net-{step}.pth")
    return path


# ---- the loop ------------------------------------------------------------------------------------

@dataclass
class TrainingResult:
    checkpoint: Path
    steps: int  # the step counter at the end (resumed runs count on from their checkpoint)
    losses: list[float] = field(default_factory=list)  # of the steps this call ran
    reference_fallbacks: int = 0  # stage 1: emotional targets paired within their own video
    start_step: int = 0  # the checkpoint step this call resumed from (0: a fresh start)


def stage_settings(config: StageConfig) -> Stage1Settings | Stage2Settings:
    d, f = config.diffusion, config.dropout
    if config.stage == 1:
        return Stage1Settings(f.uncond, f.uncond_text, f.uncond_face_locator, d.noise_offset, d.snr_gamma)
    return Stage2Settings(f.image, f.audio, f.start, d.noise_offset, d.snr_gamma)


StepFn = Callable[[TrainingModels, dict, Any, torch.Generator], StepResult]


class StageStep(nn.Module):
    """One loss evaluation as the forward of a module that owns the network, so that what accelerate
    wraps (DDP's gradient synchronisation, autocast) sees every step; the stage functions themselves call
    the network's parts directly. The frozen helpers (VAE, text encoder) are not submodules."""

    def __init__(self, models: TrainingModels, step_fn: StepFn, settings: Stage1Settings | Stage2Settings):
        super().__init__()
        self.net = models.net
        self.helpers = models
        self.step_fn = step_fn
        self.settings = settings

    def forward(self, batch: dict, generator: torch.Generator) -> StepResult:
        return self.step_fn(self.helpers, batch, self.settings, generator)


def finished_run(config: StageConfig) -> TrainingResult | None:
    """The result of a run that already reached `max_train_steps` in `output.dir` (with resume on), else None."""
    point = find_resume_point(config.output.dir) if config.output.resume else None
    if point is None or point.step < config.solver.max_train_steps:
        return None
    return TrainingResult(point.checkpoint, point.step, start_step=point.step)


def make_accelerator(config: StageConfig) -> Accelerator:
    """An Accelerator for the config: device, mixed precision and gradient accumulation. Under
    ``accelerate launch`` the launcher decides the processes and devices."""
    precision = config.solver.mixed_precision
    device = config.device
    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N for training, got {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is available; use device=cpu")
        if ":" in device and int(os.environ.get("WORLD_SIZE", "1")) == 1:
            torch.cuda.set_device(torch.device(device))  # accelerate uses the current CUDA device
    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if precision == "fp16" and cpu:
        raise ValueError("solver.mixed_precision fp16 needs a CUDA device; use bf16 or 'no' on the CPU")
    accumulation = GradientAccumulationPlugin(num_steps=config.solver.gradient_accumulation_steps,
                                              sync_with_dataloader=False)
    # find_unused_parameters: an all-unconditional stage-1 batch never runs the reference UNet
    return Accelerator(cpu=cpu, mixed_precision=precision, gradient_accumulation_plugin=accumulation,
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _release(accelerator: Accelerator) -> None:
    """Forget accelerate's per-process settings, so that a later run in this process (the next
    progressive phase, a test) may use another precision or accumulation; the process group stays."""
    accelerator.free_memory()
    AcceleratorState._reset_state()
    GradientState._reset_state()


def train(config: StageConfig, models: TrainingModels | None = None) -> TrainingResult:
    """Run one stage as configured; returns the last checkpoint (also written every `checkpointing_steps`).

    With `output.resume` (the default) a run whose output folder holds a checkpoint with its training
    state continues from the latest one: weights, optimizer, schedule, step counter, random state and
    data position; a finished run returns at once. `models` (tests) must be on the run's device."""
    config.validate()
    done = finished_run(config)
    if done is not None:
        logger.info("stage %d in %s already reached step %d (max_train_steps %d): nothing to do", config.stage,
                    config.output.dir, done.steps, config.solver.max_train_steps)
        return done
    point = find_resume_point(config.output.dir) if config.output.resume else None
    accelerator = make_accelerator(config)
    try:
        return _train(config, accelerator, models, point)
    finally:
        _release(accelerator)


def _train(config: StageConfig, accelerator: Accelerator, models: TrainingModels | None,
           point: ResumePoint | None) -> TrainingResult:
    # multi-process CPU runs report "cpu:0", which safetensors does not take as a load device
    device = torch.device("cpu") if accelerator.device.type == "cpu" else accelerator.device
    torch.manual_seed(config.seed)  # the same initial weights in every process
    # data first: a wrong dataset path should fail before minutes of model loading
    identity_dim = (models.net.config if models else resolve_net_config(config.model.config)) \
        .face_projection.identity_dim
    dataset = build_dataset(config, identity_dim)
    batch_size = config.data.batch_size
    if len(dataset) < batch_size * accelerator.num_processes:
        raise ValueError(f"the dataset has {len(dataset)} clips, fewer than data.batch_size {batch_size} x "
                         f"{accelerator.num_processes} process(es)")
    if models is None:
        build_config = config if point is None else dataclasses.replace(
            config, model=dataclasses.replace(config.model, init_checkpoint=str(point.checkpoint)))
        models = build_models(build_config, device)
    elif point is not None:
        models.net.load_state_dict(load_state_dict(point.checkpoint))
    net = models.net
    params = configure_trainable(net, config.stage)
    net.denoising_unet.gradient_checkpointing = config.solver.gradient_checkpointing
    net.train()
    sampler = EpochShuffleSampler(len(dataset), config.seed)
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        num_workers=config.data.num_workers, persistent_workers=config.data.num_workers > 0)
    optimizer = make_optimizer(params, config, device)
    # not prepared: stepped once per optimizer step below, so the warm-up counts optimizer steps whatever
    # the number of processes
    lr_schedule = warmup_then_constant(optimizer, config.solver.lr_warmup_steps)
    step_fn = stage1_step if config.stage == 1 else stage2_step
    step_module, optimizer, loader = accelerator.prepare(StageStep(models, step_fn, stage_settings(config)),
                                                         optimizer, loader)
    generator = torch.Generator(device).manual_seed(config.seed + accelerator.process_index)
    accumulation = config.solver.gradient_accumulation_steps
    out_dir = Path(config.output.dir)
    result = TrainingResult(checkpoint=point.checkpoint if point is not None else out_dir, steps=0)
    if point is not None:
        result.start_step = result.steps = point.step
        shared = load_shared_state(point)
        optimizer.load_state_dict(shared["optimizer"])
        lr_schedule.load_state_dict(shared["lr_schedule"])
        if accelerator.scaler is not None and shared.get("scaler"):
            accelerator.scaler.load_state_dict(shared["scaler"])
        result.reference_fallbacks = int(shared.get("reference_fallbacks", 0))
        draws = restore_process_state(point, accelerator.process_index, generator)
        dataset.draws = draws if draws is not None else point.step * accumulation * batch_size
        logger.info("stage %d: resuming from step %d (%s)", config.stage, point.step, point.checkpoint)

    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "train_config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False),
                                                   encoding="utf-8")
        net.config.to_json(out_dir / "config.json")
        truncate_log(out_dir / LOG_FILE, result.steps)
        logger.info("stage %d: %d clips, %d trainable tensors (%.1f M parameters), %d steps on %s x %d, "
                    "mixed precision %s", config.stage, len(dataset), len(params),
                    sum(p.numel() for p in params) / 1e6, config.solver.max_train_steps, device,
                    accelerator.num_processes, accelerator.mixed_precision)
    batches = _batches(loader, sampler, accelerator, result.steps * accumulation)
    started = time.monotonic()
    for step in range(result.steps + 1, config.solver.max_train_steps + 1):
        loss_sum, fallbacks, grad_norm = 0.0, 0, torch.zeros(())
        for _ in range(accumulation):
            batch = next(batches)
            with accelerator.accumulate(step_module):
                step_result = step_module(batch, generator)
                accelerator.backward(step_result.loss)  # divided by the accumulation steps there
                loss_sum += float(step_result.loss.detach()) / accumulation
                if config.stage == 1:
                    fallbacks += int(torch.as_tensor(batch["fallback"]).sum())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(params, config.solver.max_grad_norm)
                optimizer.step()  # accelerate skips it until the last micro-batch
                optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        totals = accelerator.reduce(torch.tensor([loss_sum, float(fallbacks)], device=device), "sum")
        loss = float(totals[0]) / accelerator.num_processes
        if not math.isfinite(loss) and accelerator.scaler is None:
            raise RuntimeError(f"stage {config.stage}: the loss is {loss} at step {step}; lower "
                               "solver.learning_rate or use mixed_precision 'no'")
        result.reference_fallbacks += int(totals[1])
        result.losses.append(loss)
        result.steps = step
        if accelerator.is_main_process:
            _log_step(out_dir, config, step, loss, float(grad_norm), lr_schedule, started, step_result, result)
        if step % config.output.checkpointing_steps == 0 or step == config.solver.max_train_steps:
            result.checkpoint = _save_point(accelerator, step_module, optimizer, lr_schedule, generator,
                                            dataset, config, step, result.reference_fallbacks)
    if config.stage == 1 and accelerator.is_main_process:
        logger.info("emotion-aware sampling: %d reference frame(s) came from the target's own video for lack "
                    "of a neutral video of the identity", result.reference_fallbacks)
    return result


def _log_step(out_dir: Path, config: StageConfig, step: int, loss: float, grad_norm: float,
              lr_schedule: torch.optim.lr_scheduler.LRScheduler, started: float, step_result: StepResult,
              result: TrainingResult) -> None:
    record = {"step": step, "loss": loss, "grad_norm": grad_norm, "lr": lr_schedule.get_last_lr()[0],
              "seconds": round(time.monotonic() - started, 2), "dropouts": step_result.dropouts.counts(),
              "fallbacks": result.reference_fallbacks}
    with (out_dir / LOG_FILE).open("a", encoding="utf-8") as log:
        log.write(json.dumps(record) + "\n")
    if step % config.output.log_every == 0 or step == 1:
        logger.info("stage %d step %d/%d: loss %.5f, grad norm %.3f", config.stage, step,
                    config.solver.max_train_steps, loss, grad_norm)


def _save_point(accelerator: Accelerator, step_module: nn.Module, optimizer: torch.optim.Optimizer,
                lr_schedule: torch.optim.lr_scheduler.LRScheduler, generator: torch.Generator,
                dataset: Dataset, config: StageConfig, step: int, fallbacks: int) -> Path:
    """Net checkpoint + training state of `step` (files from the main process, random state from each)."""
    out_dir = Path(config.output.dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        net = accelerator.unwrap_model(step_module).net
        path = save_checkpoint(net, out_dir, step, config.stage, config.output.save_pth)
    save_process_state(out_dir, step, accelerator.process_index, generator, dataset.draws)
    if accelerator.is_main_process:
        scaler = accelerator.scaler.state_dict() if accelerator.scaler is not None else None
        save_shared_state(out_dir, step, {"optimizer": optimizer.state_dict(),
                                          "lr_schedule": lr_schedule.state_dict(), "scaler": scaler,
                                          "reference_fallbacks": fallbacks})
        logger.info("wrote %s", path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        prune_states(out_dir, step)
    return out_dir / f"net-{step}.safetensors"
