"""FaceLocator: encodes the face-region box (an image in [0,1]) into features added after `conv_in`."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import FaceLocatorConfig


class FaceLocator(nn.Module):
    def __init__(self, config: FaceLocatorConfig, zero_init: bool = True) -> None:
        super().__init__()
        ch = config.block_out_channels
        self.conv_in = nn.Conv2d(config.conditioning_channels, ch[0], kernel_size=3, padding=1)
        blocks = []
        for c_in, c_out in zip(ch[:-1], ch[1:]):
            blocks.append(nn.Conv2d(c_in, c_in, kernel_size=3, padding=1))
            blocks.append(nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, stride=2))
        self.blocks = nn.ModuleList(blocks)
        self.conv_out = nn.Conv2d(ch[-1], config.conditioning_embedding_channels, kernel_size=3, padding=1)
        if zero_init:  # starts as "no face-region signal", like a ControlNet hint encoder
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    def forward(self, face_region: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) in [0,1] -> (N, C, H/8, W/8). Frames are independent: run it on one and broadcast."""
        h = F.silu(self.conv_in(face_region))
        for block in self.blocks:
            h = F.silu(block(h))
        return self.conv_out(h)
