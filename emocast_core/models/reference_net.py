"""ReferenceNet: an SD1.5 2D UNet run once per clip on the reference image and motion frames.

Only its side effect matters: every spatial transformer writes its LayerNorm-ed self-attention input to a
`ReferenceBank`. It has no output head (the released file has no `conv_norm_out` / `conv_out`), and its
forward stops at the last bank write, since nothing after it is used.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import NetConfig
from .reference_attention import ReferenceBank, bank_writer, spatial_transformer, to_tokens
from .unet_body import attention_paths, build_sd_unet, time_embedding, unet_body


class ReferenceNet(nn.Module):
    def __init__(self, config: NetConfig) -> None:
        super().__init__()
        base = build_sd_unet(config)
        self.conv_in = base.conv_in
        self.time_proj = base.time_proj
        self.time_embedding = base.time_embedding
        self.down_blocks = base.down_blocks
        self.mid_block = base.mid_block
        self.up_blocks = base.up_blocks

    def forward(self, latents: torch.Tensor, context: torch.Tensor,
                timestep: torch.Tensor | float = 0) -> ReferenceBank:
        """latents (N, 4, h, w), context (N, tokens, D) -> the bank of all spatial blocks."""
        bank = ReferenceBank()
        write = bank_writer(bank)
        last = attention_paths(self)[-1]

        def layer(block: nn.Module, j: int, path: str, h: torch.Tensor) -> torch.Tensor:
            attn_block = block.attentions[j]
            if path == last:  # the final write; the rest of the network is unused
                tb = attn_block.transformer_blocks[0]
                bank.write(path, tb.norm1(to_tokens(attn_block, h)))
                return h
            return spatial_transformer(attn_block, h, context, path, write)

        emb = time_embedding(self, timestep, latents.shape[0], latents.dtype, latents.device)
        unet_body(self, self.conv_in(latents), emb, layer)
        return bank
