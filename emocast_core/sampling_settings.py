"""The settings of one generation run: steps, guidance, seed, clip chaining, branch weights, precision details.

Its field defaults are the release's and the only place they are written: the CLI options, the ComfyUI
widgets and the tests read them from here. It imports nothing, not even torch, so that ComfyUI can build
the widgets of the nodes without loading the library; precisions are torch dtypes or their names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class SamplingSettings:
    steps: int = 40
    cfg: float = 3.5
    seed: int = 42
    clip_length: int = 16
    motion_frames: int = 2
    weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # pose, face, lip
    # The release hands the reference bank to the denoising UNet in fp16 whatever the run dtype.
    bank_dtype: torch.dtype | str | None = "float16"
    # Precision the initial noise is drawn in; None: the run dtype, as released (so a seed gives other
    # noise in fp16 than in fp32). fp32 makes a seed give the same video in every precision.
    noise_dtype: torch.dtype | str | None = None
    decode_batch: int = 4

    def validate(self) -> None:
        """Refuse values the sampler cannot use, each by name, with what to do; nothing here needs a model, so
        front-ends call it before loading anything."""
        _whole("steps", self.steps, 1, MAX_STEPS, f"{SamplingSettings.steps} is the default; at most {MAX_STEPS}, "
               "the number of timesteps the model was trained on")
        _number("cfg", self.cfg)
        if not 1.0 < self.cfg <= MAX_CFG:
            raise ValueError(f"cfg must be above 1.0 and at most {MAX_CFG} (got {self.cfg}): the model was trained "
                             "with classifier-free guidance and the release always runs both halves; "
                             f"{SamplingSettings.cfg} is the default")
        _whole("seed", self.seed, 0, MAX_SEED, "any whole number from 0 to 2**64 - 1")
        _whole("motion_frames", self.motion_frames, 1, MAX_CLIP_FRAMES - 2, "frames carried from one clip to the next")
        _whole("clip_length", self.clip_length, self.motion_frames + 1, MAX_CLIP_FRAMES - self.motion_frames,
               f"frames generated together, each clip continuing from the last {self.motion_frames} frames of the "
               f"previous one, and clip plus motion frames at most {MAX_CLIP_FRAMES} (the motion modules' position "
               f"encoding); {SamplingSettings.clip_length} is the default")
        if len(self.weights) != 3:
            raise ValueError(f"weights must be three numbers (pose, face, lip), got {self.weights!r}")
        for name, weight in zip(("pose", "face", "lip"), self.weights):
            _number(f"the {name} weight", weight)
            if not 0.0 <= weight <= MAX_BRANCH_WEIGHT:
                raise ValueError(f"the {name} weight must be between 0 and {MAX_BRANCH_WEIGHT} (got {weight}); 1.0 "
                                 "is the released strength of that audio branch")
        _whole("decode_batch", self.decode_batch, 1, None, "frames the VAE decodes at once")


def check_size(size: int) -> None:
    """The side of the square frames: a multiple of the UNet's total downsampling, within sane bounds."""
    if isinstance(size, bool) or not isinstance(size, int) or size % IMAGE_SIZE_MULTIPLE or \
            not IMAGE_SIZE_MULTIPLE <= size <= MAX_SIZE:
        raise ValueError(f"size must be a multiple of {IMAGE_SIZE_MULTIPLE} from {IMAGE_SIZE_MULTIPLE} to {MAX_SIZE} "
                         f"(got {size!r}); the model was trained at 512")


# The latents are 1/8 of the image and the UNet halves them three times: sides must divide by 8 * 2**3.
IMAGE_SIZE_MULTIPLE = 64
# Twice the training size: one clip's attention at 2048 px would need hundreds of GB.
MAX_SIZE = 1024
# Upper bounds of values that are absurd beyond them.
MAX_STEPS = 1000  # the scheduler's training timesteps: DDIM cannot take more steps
MAX_CFG = 30.0
MAX_SEED = 2**64 - 1  # what torch.Generator.manual_seed accepts
MAX_CLIP_FRAMES = 32  # the motion modules' temporal position encoding covers 32 frames
MAX_BRANCH_WEIGHT = 10.0


def _whole(name: str, value: object, low: int, high: int | None, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be a whole number (got {value!r}): {what}")
    if value < low or (high is not None and value > high):
        bounds = f"at least {low}" if high is None else f"from {low} to {high}"
        raise ValueError(f"{name} must be {bounds} (got {value}): {what}")


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number (got {value!r})")
