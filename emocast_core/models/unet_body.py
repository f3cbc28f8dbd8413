"""The SD1.5 UNet skeleton shared by the ReferenceNet and the denoising UNet.

Both networks are built from diffusers' `UNet2DConditionModel` parts (ResNets, spatial transformers,
down/up samplers, time embedding), so their parameter names are diffusers' and SD1.5 weights load as
they are. We drive the parts ourselves because each spatial transformer layer needs extra work that a
stock forward cannot express: reference-bank exchange, and in the denoising UNet the emotive audio
attention and the motion module after it. Frames are folded into the batch: every 2D op is per frame.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from ..config import NetConfig
from .text_guided_emotive_attention import install_decoupled_attention

# (block, layer index, path of the layer's spatial transformer, features) -> features
LayerFn = Callable[[nn.Module, int, str, torch.Tensor], torch.Tensor]


def build_sd_unet(config: NetConfig) -> UNet2DConditionModel:
    """A diffusers SD UNet whose cross-attentions are the decoupled text/face attention."""
    unet = UNet2DConditionModel(**config.unet)
    install_decoupled_attention(unet, config.context_dim, config.face_projection.tokens)
    return unet


def has_attention(block: nn.Module) -> bool:
    return getattr(block, "attentions", None) is not None


def time_embedding(net: nn.Module, timestep: torch.Tensor | float | int, batch: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(batch, 1280): sinusoidal features computed in fp32, cast to the run dtype, then the MLP."""
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t[None]
    t = t.expand(batch)
    return net.time_embedding(net.time_proj(t).to(dtype=dtype))


def unet_body(net: nn.Module, h: torch.Tensor, emb: torch.Tensor, layer: LayerFn) -> torch.Tensor:
    """conv_in output -> last up-block output. `layer` runs after each ResNet of an attention block."""
    skips = [h]
    for i, block in enumerate(net.down_blocks):
        for j, resnet in enumerate(block.resnets):
            h = resnet(h, emb)
            if has_attention(block):
                h = layer(block, j, f"down_blocks.{i}.attentions.{j}", h)
            skips.append(h)
        for down in block.downsamplers or []:
            h = down(h)
            skips.append(h)
    mid = net.mid_block
    h = mid.resnets[0](h, emb)
    for j, resnet in enumerate(mid.resnets[1:]):
        h = layer(mid, j, f"mid_block.attentions.{j}", h)
        h = resnet(h, emb)
    for i, block in enumerate(net.up_blocks):
        for j, resnet in enumerate(block.resnets):
            h = resnet(torch.cat([h, skips.pop()], dim=1), emb)
            if has_attention(block):
                h = layer(block, j, f"up_blocks.{i}.attentions.{j}", h)
        for up in block.upsamplers or []:
            h = up(h, output_size=skips[-1].shape[-2:])
    return h


def attention_paths(net: nn.Module) -> list[str]:
    """Paths of every spatial transformer, in execution order."""
    paths = []
    for kind, blocks in (("down_blocks", net.down_blocks), ("mid_block", [net.mid_block]),
                         ("up_blocks", net.up_blocks)):
        for i, block in enumerate(blocks):
            prefix = kind if kind == "mid_block" else f"{kind}.{i}"
            for j in range(len(getattr(block, "attentions", None) or [])):
                paths.append(f"{prefix}.attentions.{j}")
    return paths
