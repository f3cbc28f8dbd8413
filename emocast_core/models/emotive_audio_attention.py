"""Emotive audio attention (paper §3.2.2).

First the emotion text attends to the audio tokens (`attn_audioemo`): 77 "emotion-aware audio" tokens per
frame. The frame's features then attend to those tokens in three branches, pose (background mask; released
parameters `attn2_0`, `zero_conv_full`), face (face-without-lips mask; `attn2_1`, `zero_conv_face`) and lip
(lip mask; `attn2_2`, `zero_conv_lip`); each branch is masked, passed through its own zero-initialised 1x1
conv and added with the user's `(pose, face, lip)` weights. The mask multiplies before the conv, so the conv
bias reaches every token. The parameter names are the release's (strict loading), hence `full` for pose.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_processor import Attention
from torch import nn

from .attention import attend


def _zero_conv(channels: int, zero_init: bool) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1)
    if zero_init:
        nn.init.zeros_(conv.weight)
        nn.init.zeros_(conv.bias)
    return conv


class EmotiveAudioBlock(nn.Module):
    def __init__(self, dim: int, heads: int, token_dim: int = 768, emotion_head_dim: int = 80,
                 zero_init: bool = True) -> None:
        super().__init__()
        head_dim = dim // heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(query_dim=dim, heads=heads, dim_head=head_dim, bias=False)
        self.attn_audioemo = Attention(query_dim=token_dim, cross_attention_dim=token_dim, heads=heads,
                                       dim_head=emotion_head_dim, bias=False)
        self.postnorm_audioemo = nn.LayerNorm(token_dim)
        self.norm2 = nn.LayerNorm(dim)
        for i in range(3):
            setattr(self, f"attn2_{i}", Attention(query_dim=dim, cross_attention_dim=token_dim, heads=heads,
                                                  dim_head=head_dim, bias=False))
        self.zero_conv_full = _zero_conv(dim, zero_init)
        self.zero_conv_face = _zero_conv(dim, zero_init)
        self.zero_conv_lip = _zero_conv(dim, zero_init)
        self.ff = FeedForward(dim, dropout=0.0, activation_fn="geglu")
        self.norm3 = nn.LayerNorm(dim)

    def emotion_aware_audio(self, emotion: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """f_ea = LayerNorm(CA(Q = emotion text, K = V = audio tokens)): (N, 77, D)."""
        return self.postnorm_audioemo(attend(self.attn_audioemo, emotion, audio))

    def forward(self, h: torch.Tensor, size: tuple[int, int], audio: torch.Tensor, emotion: torch.Tensor,
                masks: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """h: (N, L, I) tokens; masks: (pose, face, lip), each (N or 1, L); weights: (pose, face, lip)."""
        h = attend(self.attn1, self.norm1(h)) + h
        f_ea = self.emotion_aware_audio(emotion, audio)
        normed = self.norm2(h)
        branches = []
        for attn, conv, mask in zip((self.attn2_0, self.attn2_1, self.attn2_2),
                                    (self.zero_conv_full, self.zero_conv_face, self.zero_conv_lip), masks):
            masked = attend(attn, normed, f_ea) * mask.to(h.dtype)[:, :, None]
            maps = masked.transpose(1, 2).unflatten(2, size)
            branches.append(conv(maps).flatten(2).transpose(1, 2))
        pose, face, lip = branches
        h = weights[0] * pose + weights[1] * face + weights[2] * lip + h
        return self.ff(self.norm3(h)) + h


class EmotiveAudioModule(nn.Module):
    """Wrapper: per-frame GroupNorm, 1x1 conv to the inner width, one `EmotiveAudioBlock`, 1x1 conv back,
    residual. `level` selects the mask resolution (0 = full latent size)."""

    def __init__(self, channels: int, inner: int, heads: int, level: int, token_dim: int = 768,
                 emotion_head_dim: int = 80, norm_groups: int = 32, zero_init: bool = True) -> None:
        super().__init__()
        self.level = level
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, inner, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            [EmotiveAudioBlock(inner, heads, token_dim, emotion_head_dim, zero_init)])
        self.proj_out = nn.Conv2d(inner, channels, kernel_size=1)

    def forward(self, x: torch.Tensor, audio: torch.Tensor, emotion: torch.Tensor,
                masks: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> torch.Tensor:
        """x: (N, C, H, W); audio: (N, T_audio, D); emotion: (N, 77, D); masks: (pose, face, lip) lists per level."""
        n, _, height, width = x.shape
        h = self.proj_in(self.norm(x))
        inner = h.shape[1]
        h = h.flatten(2).transpose(1, 2)
        level_masks = [m[self.level] for m in masks]
        for block in self.transformer_blocks:
            h = block(h, (height, width), audio, emotion, level_masks, weights)
        h = h.transpose(1, 2).reshape(n, inner, height, width)
        return self.proj_out(h) + x
