"""ReferenceNet: an SD1.5 2D UNet run once per clip on the reference image and motion frames.

Only its side effect matters: every spatial transformer writes its LayerNorm-ed self-attention input to a
`ReferenceBank`. It has no output head (the released file has no `conv_norm_out` / `conv_out`), and its
forward stops at the last bank write, since nothing after it is used.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import NetConfig
from .diffusers_unet import (REFERENCE_PARTS, adopt_parts, attention_paths, build_sd_unet, self_attention_input,
                             spatial_layer, spatial_transformer, time_embedding, unet_body)
from .reference_attention import ReferenceBank, bank_writer
from .text_guided_emotive_attention import install_decoupled_attention


class ReferenceNet(nn.Module):
    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        base = build_sd_unet(config)
        install_decoupled_attention(base, config.context_dim, config.face_projection.tokens)
        adopt_parts(self, base, REFERENCE_PARTS)

    def forward(self, latents: torch.Tensor, context: torch.Tensor,
                timestep: torch.Tensor | float = 0) -> ReferenceBank:
        """latents (N, 4, h, w), context (N, tokens, D) -> the bank of all spatial blocks."""
        bank = ReferenceBank()
        write = bank_writer(bank)
        last = attention_paths(self)[-1]

        def layer(block: nn.Module, j: int, path: str, h: torch.Tensor) -> torch.Tensor:
            attn_block = spatial_layer(block, j)
            if path == last:  # the final write; the rest of the network is unused
                bank.write(path, self_attention_input(attn_block, h))
                return h
            return spatial_transformer(attn_block, h, context, path, write)

        emb = time_embedding(self, timestep, latents.shape[0], latents.dtype, latents.device)
        unet_body(self, self.conv_in(latents), emb, layer)
        return bank
