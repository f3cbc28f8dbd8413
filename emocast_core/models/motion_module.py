"""AnimateDiff v2 motion module: temporal self-attention over the frames at every spatial position.

Parameter names are those of `mm_sd_v15_v2.ckpt` (`temporal_transformer.*`). The clip arrives with the
motion frames in front (docs/model.md §3.7); the sinusoidal position encoding is added to the
LayerNorm-ed tokens (queries, keys and values), never to the residual stream.
"""
from __future__ import annotations

import math

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import attend


def sinusoidal_positions(max_len: int, dim: int) -> torch.Tensor:
    """(1, max_len, dim): sin on even channels, cos on odd ones (AnimateDiff's encoding)."""
    position = torch.arange(max_len, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(1, max_len, dim)
    pe[0, :, 0::2] = torch.sin(position * freq)
    pe[0, :, 1::2] = torch.cos(position * freq)
    return pe


class PositionalEncoding(nn.Module):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        # Persistent: the released file stores it and a strict load expects it.
        self.register_buffer("pe", sinusoidal_positions(max_len, dim), persistent=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[1]:
            raise ValueError(f"a motion module sees {x.shape[1]} frames but its position encoding has only "
                             f"{self.pe.shape[1]}: use shorter clips")
        return x + self.pe[:, : x.shape[1]].to(x.dtype)


class TemporalSelfAttention(Attention):
    """A diffusers `Attention` that carries its own position encoding (`attention_blocks.i.pos_encoder`)."""

    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__(query_dim=dim, heads=heads, dim_head=dim // heads, bias=False)
        self.pos_encoder = PositionalEncoding(dim, max_len)

    def temporal(self, normed: torch.Tensor, frames: int) -> torch.Tensor:
        """normed: (B*F, L, C) tokens -> attention along F for each of the B*L positions."""
        bf, tokens, channels = normed.shape
        seq = normed.reshape(bf // frames, frames, tokens, channels).transpose(1, 2)
        seq = self.pos_encoder(seq.reshape(-1, frames, channels))
        out = attend(self, seq)
        return out.reshape(bf // frames, tokens, frames, channels).transpose(1, 2).reshape(bf, tokens, channels)


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.attention_blocks = nn.ModuleList([TemporalSelfAttention(dim, heads, max_len) for _ in range(2)])
        self.norms = nn.ModuleList([nn.LayerNorm(dim) for _ in range(2)])
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, h: torch.Tensor, frames: int) -> torch.Tensor:
        for attn, norm in zip(self.attention_blocks, self.norms):
            h = attn.temporal(norm(h), frames) + h
        return self.ff(self.ff_norm(h)) + h


class TemporalTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, norm_groups: int = 32) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, dim, eps=1e-6)
        self.proj_in = nn.Linear(dim, dim)
        self.transformer_blocks = nn.ModuleList([TemporalTransformerBlock(dim, heads, max_len)])
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, F, C, H, W) -> same shape."""
        b, frames, c, height, width = x.shape
        folded = x.flatten(0, 1)
        h = self.norm(folded).flatten(2).transpose(1, 2)  # GroupNorm per frame, then row-major tokens
        h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, frames)
        h = self.proj_out(h).transpose(1, 2).reshape(b * frames, c, height, width)
        return (h + folded).unflatten(0, (b, frames))


class MotionModule(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, zero_init: bool = True) -> None:
        super().__init__()
        self.temporal_transformer = TemporalTransformer(dim, heads, max_len)
        if zero_init:  # AnimateDiff starts every motion module as the identity
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, frames: int, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B*F, C, H, W) frame-folded features; prefix: (B, M, L, C) motion-frame tokens (row-major),
        run in front of the clip and dropped afterwards."""
        bf, c, height, width = x.shape
        clip = x.unflatten(0, (bf // frames, frames))
        if prefix is not None:
            maps = prefix.transpose(-1, -2).reshape(prefix.shape[0], prefix.shape[1], c, height, width)
            clip = torch.cat([maps.to(clip.dtype), clip], dim=1)
        out = self.temporal_transformer(clip)
        return out[:, out.shape[1] - frames:].flatten(0, 1)
