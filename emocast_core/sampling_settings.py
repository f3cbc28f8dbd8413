"""The settings of one generation run: steps, guidance, seed, clip chaining, branch weights, precision details.

Its field defaults are the release's and the only place they are written: the CLI options, the ComfyUI
widgets and the tests read them from here. It imports nothing, not even torch, so that ComfyUI can build
the widgets of the nodes without loading the library; precisions are torch dtypes or their names.
"""
from __future__ import annotations

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
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1 (got {self.steps})")
        if self.cfg <= 1.0:
            raise ValueError(f"cfg must be above 1.0 (got {self.cfg}): the model was trained with classifier-"
                             f"free guidance and the release always runs both halves; {SamplingSettings.cfg} is the "
                             "default")
        if not 1 <= self.motion_frames < self.clip_length:
            raise ValueError("motion_frames must be between 1 and clip_length - 1")
        if self.clip_length + self.motion_frames > 32:
            raise ValueError("clip_length + motion_frames must be at most 32 (the motion modules' position "
                             "encoding length)")
