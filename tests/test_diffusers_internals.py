"""All access to diffusers' UNet internals goes through emocast_core/models/diffusers_unet.py, and a diffusers
release that changes them is caught with a message that names what moved."""
from __future__ import annotations

import re

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import ROOT
from emocast_core.config import NetConfig
from emocast_core.models import diffusers_unet
from emocast_core.models.net import build_net

ADAPTER = ROOT / "emocast_core" / "models" / "diffusers_unet.py"
# Reads of diffusers block internals (our own modules' attributes of the same names are not diffusers').
INTERNAL_READ = re.compile(r"\.attentions\[|\.resnets\b|\.downsamplers\b|\.upsamplers\b|transformer_blocks\[0\]|"
                           r"\.attn2\b|BasicTransformerBlock|Transformer2DModel|\.time_proj\b")


def test_the_installed_diffusers_has_every_internal_we_use():
    diffusers_unet.check_diffusers_internals()
    # and so do the real networks, built from it
    net = build_net(NetConfig.tiny(), device="meta")
    for unet in (net.reference_unet, net.denoising_unet):
        assert all(hasattr(unet, part) for part in diffusers_unet.REFERENCE_PARTS)


def test_a_changed_internal_is_named():
    with torch.device("meta"):
        unet = UNet2DConditionModel(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                                    cross_attention_dim=16, attention_head_dim=2,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    block = next(m for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    block.renamed_norm = block.norm1
    del block.norm1
    del unet.down_blocks[0].downsamplers
    with pytest.raises(RuntimeError, match=r"diffusers \S+ changed the UNet internals EmoCAST drives: "
                                           r"down block\.downsamplers, BasicTransformerBlock\.norm1 not found"):
        diffusers_unet.check_diffusers_internals(unet)


def test_no_other_module_reaches_into_diffusers_blocks():
    offenders = []
    for path in sorted([*ROOT.joinpath("emocast_core").rglob("*.py"), *ROOT.joinpath("training").rglob("*.py"),
                        *ROOT.joinpath("nodes").rglob("*.py")]):
        if path == ADAPTER:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if INTERNAL_READ.search(code):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "diffusers internals outside diffusers_unet.py:\n" + "\n".join(offenders)
