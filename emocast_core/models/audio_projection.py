"""Audio projection: a 5-frame window of 12 wav2vec2 layers -> 32 audio tokens per frame (`AudioProjModel`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import AudioProjectionConfig


class AudioProjection(nn.Module):
    def __init__(self, config: AudioProjectionConfig) -> None:
        super().__init__()
        self.config = config
        width = config.window * config.layers * config.channels
        self.proj1 = nn.Linear(width, config.intermediate_dim)
        self.proj2 = nn.Linear(config.intermediate_dim, config.intermediate_dim)
        self.proj3 = nn.Linear(config.intermediate_dim, config.context_tokens * config.output_dim)
        self.norm = nn.LayerNorm(config.output_dim)

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """(B, F, window, layers, channels) -> (B, F, tokens, output_dim); flattened in (window, layer, channel) order."""
        c = self.config
        expected = (c.window, c.layers, c.channels)
        if tuple(windows.shape[2:]) != expected:
            raise ValueError(f"audio windows must be (batch, frames, {c.window}, {c.layers}, {c.channels}); got "
                             f"{tuple(windows.shape)}: is the wav2vec2 model the one this checkpoint expects?")
        b, frames = windows.shape[:2]
        h = F.relu(self.proj1(windows.reshape(b * frames, -1)))
        h = F.relu(self.proj2(h))
        h = self.proj3(h).reshape(b, frames, c.context_tokens, c.output_dim)
        return self.norm(h)
