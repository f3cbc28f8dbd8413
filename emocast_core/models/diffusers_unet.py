"""The one module that reaches into diffusers' UNet internals.

Both EmoCAST UNets are built from diffusers' `UNet2DConditionModel` parts (ResNets, spatial transformers,
down/up samplers, time embedding), so their parameter names are diffusers' and SD1.5 weights load as they
are. We drive the parts ourselves because each spatial transformer layer needs extra work that a stock
forward cannot express: the reference-bank exchange, and in the denoising UNet the emotive audio attention
and the motion module after it. Frames are folded into the batch: every 2D op is per frame.

Every attribute of diffusers' blocks that EmoCAST relies on is read here and nowhere else (`INTERNALS`);
`check_diffusers_internals` builds a tiny UNet and looks for each, so a diffusers release that renames or
restructures one of them fails with a message naming it instead of a stray AttributeError deep in a forward.
The range of diffusers versions we test is in `pyproject.toml` and the README.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn

from ..config import NetConfig
from .attention import attend

# (block, layer index, path of the layer's spatial transformer, features) -> features
LayerFn = Callable[[nn.Module, int, str, torch.Tensor], torch.Tensor]
# (path of the spatial transformer, its self-attention, LayerNorm-ed tokens) -> attention output
SelfAttention = Callable[[str, Attention, torch.Tensor], torch.Tensor]

# The UNet2DConditionModel parts each network adopts, in the order it registers them (its parameter order).
# The ReferenceNet has no output head: its output is never decoded.
REFERENCE_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "mid_block", "up_blocks")
DENOISING_PARTS = ("conv_in", "time_proj", "time_embedding", "down_blocks", "up_blocks", "mid_block",
                   "conv_norm_out", "conv_act", "conv_out")
# What is read inside diffusers' modules, by the kind of module it is read from.
INTERNALS: dict[str, tuple[str, ...]] = {
    "UNet2DConditionModel": DENOISING_PARTS,
    "down block": ("resnets", "downsamplers"),
    "mid block": ("resnets", "attentions"),
    "up block": ("resnets", "upsamplers"),
    "cross-attention block": ("attentions",),
    "Transformer2DModel": ("norm", "proj_in", "proj_out", "transformer_blocks"),
    "BasicTransformerBlock": ("norm1", "attn1", "norm2", "attn2", "norm3", "ff"),
    "Attention": ("to_q", "to_k", "to_v", "to_out", "heads", "set_processor"),
}


def build_sd_unet(config: NetConfig) -> UNet2DConditionModel:
    return UNet2DConditionModel(**config.unet)


def adopt_parts(target: nn.Module, unet: UNet2DConditionModel, parts: tuple[str, ...]) -> None:
    """Make these parts of a built diffusers UNet submodules of `target` (same names, so the same keys)."""
    for name in parts:
        setattr(target, name, getattr(unet, name))


def cross_attentions(unet: nn.Module) -> Iterator[Attention]:
    """The cross-attention (`attn2`) of every spatial transformer block."""
    for module in unet.modules():
        if isinstance(module, BasicTransformerBlock) and module.attn2 is not None:
            yield module.attn2


def has_attention(block: nn.Module) -> bool:
    return getattr(block, "attentions", None) is not None


def spatial_layer(block: nn.Module, j: int) -> Transformer2DModel:
    """The j-th spatial transformer of a down / mid / up block."""
    return block.attentions[j]


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


def plain_self_attention(_path: str, attn: Attention, normed: torch.Tensor) -> torch.Tensor:
    return attend(attn, normed)


def to_tokens(block: Transformer2DModel, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W, C) after the wrapper's GroupNorm and input projection (row-major tokens)."""
    h = block.proj_in(block.norm(x))
    return h.flatten(2).transpose(1, 2)


def self_attention_input(block: Transformer2DModel, x: torch.Tensor) -> torch.Tensor:
    """The LayerNorm-ed tokens a spatial transformer's self-attention sees (what the reference bank stores)."""
    return block.transformer_blocks[0].norm1(to_tokens(block, x))


def spatial_transformer(block: Transformer2DModel, x: torch.Tensor, context: torch.Tensor, path: str,
                        self_attention: SelfAttention = plain_self_attention) -> torch.Tensor:
    """One SD spatial transformer (a diffusers `Transformer2DModel` with one block), per frame.

    Driven here rather than through diffusers' forward because the self-attention must exchange
    features with the other UNet; the sub-modules and their order are diffusers' own."""
    n, c, height, width = x.shape
    h = to_tokens(block, x)
    tb = block.transformer_blocks[0]
    h = self_attention(path, tb.attn1, tb.norm1(h)) + h
    h = tb.attn2(tb.norm2(h), encoder_hidden_states=context) + h
    h = tb.ff(tb.norm3(h)) + h
    h = h.transpose(1, 2).reshape(n, c, height, width)
    return block.proj_out(h) + x


def check_diffusers_internals(unet: UNet2DConditionModel | None = None) -> None:
    """Raise RuntimeError naming every attribute of `INTERNALS` that this diffusers version lacks (checked
    on `unet`, or on a tiny SD-shaped UNet built on the meta device)."""
    import diffusers

    if unet is None:
        with torch.device("meta"):
            unet = UNet2DConditionModel(
                block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
                attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    spatial = next((m for m in unet.modules() if isinstance(m, Transformer2DModel)), None)
    blocks = next((m for m in unet.modules() if isinstance(m, BasicTransformerBlock)), None)
    attention = next((m for m in unet.modules() if isinstance(m, Attention)), None)
    owners = {
        "UNet2DConditionModel": [unet],
        "down block": [b for b in getattr(unet, "down_blocks", [])],
        "mid block": [getattr(unet, "mid_block", None)],
        "up block": [b for b in getattr(unet, "up_blocks", [])],
        "cross-attention block": [b for b in (*getattr(unet, "down_blocks", []), *getattr(unet, "up_blocks", []))
                                  if type(b).__name__.startswith("CrossAttn")],
        "Transformer2DModel": [spatial],
        "BasicTransformerBlock": [blocks],
        "Attention": [attention],
    }
    missing = [f"{kind}.{name}" for kind, names in INTERNALS.items() for name in names
               if not owners[kind] or any(m is None or not hasattr(m, name) for m in owners[kind])]
    if missing:
        raise RuntimeError(f"diffusers {diffusers.__version__} changed the UNet internals EmoCAST drives: "
                           f"{', '.join(missing)} not found. Install a diffusers version in the tested range "
                           "(see the README), or report it so the adapter in emocast_core/models/diffusers_unet.py "
                           "can follow")
