"""The networks' parameter layout is the released `net.pth`'s, name for name and shape for shape."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import FIXTURES
from emocast_core.config import NetConfig
from emocast_core.models.net import PREFIXES, build_net


def _layout(net: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in net.state_dict().items()}


@pytest.mark.parametrize("name, manifest", [("full", "official_net_keys.json"),
                                            ("tiny", "official_net_keys_tiny.json")])
def test_layout_equals_official_manifest(name, manifest):
    official = json.loads((FIXTURES / "manifests" / manifest).read_text())
    net = build_net(NetConfig.builtin(name), device="meta")
    ours = _layout(net)
    assert sorted(set(official["keys"]) - set(ours)) == []
    assert sorted(set(ours) - set(official["keys"])) == []
    mismatched = {k: (ours[k], v) for k, v in official["keys"].items() if ours[k] != v}
    assert mismatched == {}
    for prefix in PREFIXES:
        expected = official["counts"][prefix]
        keys = [k for k in ours if k.startswith(prefix + ".")]
        assert len(keys) == expected["n_keys"], prefix
        params = sum(p.numel() for p in getattr(net, prefix).parameters())
        buffers = sum(b.numel() for b in getattr(net, prefix).buffers())
        assert params == expected["n_params"], prefix
        assert buffers == expected["n_buffer_elems"], prefix


def test_full_model_families():
    sd = build_net(NetConfig.full(), device="meta").state_dict()
    assert len(sd) == 2832
    pe = [k for k in sd if k.endswith("pos_encoder.pe")]
    assert len(pe) == 42 and all(sd[k].shape[:2] == (1, 32) for k in pe)
    assert len([k for k in sd if k.startswith("denoising_unet") and "to_k_ip.0" in k]) == 16
    assert len([k for k in sd if "to_k_ip.0" in k]) == 32
    audio = {m.group(1) for k in sd if (m := re.match(r"(.*\.audio_modules\.\d+)\.", k))}
    assert len(audio) == 16
    motion = {m.group(1) for k in sd if (m := re.match(r"(.*\.motion_modules\.\d+)\.", k))}
    assert len(motion) == 21
    # inner widths of the audio modules (docs/model.md §2.3): the odd ones come from the input channels
    inner = {k.split(".proj_in")[0].removeprefix("denoising_unet."): tuple(sd[k].shape[:2])
             for k in sd if ".audio_modules." in k and k.endswith("proj_in.weight")}
    assert inner["down_blocks.1.audio_modules.0"] == (320, 640)
    assert inner["down_blocks.1.audio_modules.1"] == (640, 640)
    assert inner["down_blocks.2.audio_modules.0"] == (640, 1280)
    assert inner["up_blocks.1.audio_modules.2"] == (640, 1280)
    assert inner["up_blocks.2.audio_modules.0"] == (320, 640)
    assert inner["mid_block.audio_modules.0"] == (1280, 1280)
    emo = sd["denoising_unet.up_blocks.3.audio_modules.1.transformer_blocks.0.attn_audioemo.to_q.weight"]
    assert tuple(emo.shape) == (640, 768)


def test_reference_net_has_no_output_head():
    sd = build_net(NetConfig.tiny(), device="meta").reference_unet.state_dict()
    assert not any(k.startswith(("conv_out", "conv_norm_out")) for k in sd)


def test_config_round_trip(tmp_path):
    cfg = NetConfig.tiny()
    cfg.to_json(tmp_path / "c.json")
    assert NetConfig.from_json(tmp_path / "c.json") == cfg


def test_unsupported_config_is_refused():
    data = NetConfig.tiny().to_dict()
    data["unet_additional_kwargs"]["unet_use_temporal_attention"] = True
    with pytest.raises(ValueError, match="unet_use_temporal_attention"):
        NetConfig.from_dict(data)
    with pytest.raises(ValueError, match="no built-in model config named 'huge'"):
        NetConfig.builtin("huge")
