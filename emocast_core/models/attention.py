"""Multi-head attention through the projections of a diffusers `Attention` module.

Every attention of EmoCAST (spatial, reference, decoupled, audio, temporal) is "project, split heads,
softmax(QK^T/sqrt(d))V, merge heads, output projection"; they differ only in where keys and values come
from. diffusers' `Attention` holds the projections (so parameter names match the checkpoint) and torch's
`scaled_dot_product_attention` does the math (and picks flash / memory-efficient kernels on a GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention


def heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Lq, H*d), (B, Lk, H*d), (B, Lk, H*d) -> (B, Lq, H*d): per-head softmax attention, heads merged."""
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def output_projection(attn: Attention, hidden: torch.Tensor) -> torch.Tensor:
    return attn.to_out[1](attn.to_out[0](hidden))


def attend(attn: Attention, hidden: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """Self-attention (context None) or cross-attention of `hidden` over `context`."""
    context = hidden if context is None else context
    out = heads_attention(attn.to_q(hidden), attn.to_k(context), attn.to_v(context), attn.heads)
    return output_projection(attn, out)
