"""Face-embedding projection: a 512-d ArcFace identity embedding -> 4 face tokens (official `ImageProjModel`)."""
from __future__ import annotations

import torch
from torch import nn

from ..config import FaceProjectionConfig


class FaceProjection(nn.Module):
    def __init__(self, config: FaceProjectionConfig) -> None:
        super().__init__()
        self.tokens = config.tokens
        self.proj = nn.Linear(config.identity_dim, config.tokens * config.token_dim)
        self.norm = nn.LayerNorm(config.token_dim)

    def forward(self, identity: torch.Tensor) -> torch.Tensor:
        """(B, 512) raw (un-normalised) embedding -> (B, tokens, token_dim)."""
        return self.norm(self.proj(identity).reshape(identity.shape[0], self.tokens, -1))
