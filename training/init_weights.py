"""The networks as training starts: SD1.5 UNet weights in both UNets, AnimateDiff motion modules in the
denoising UNet, fresh initialisation elsewhere."""
from __future__ import annotations

import inspect as pyinspect
import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from emocast_core.checkpoints import (CheckpointError, compare_layout, describe_config, format_report, load_state_dict,
                                      read_layout)
from emocast_core.config import NetConfig
from emocast_core.models.net import DENOISING_UNET, REFERENCE_UNET, EmoCASTNet, build_net

logger = logging.getLogger(__name__)

# Parts of the SD1.5 UNet that the reference UNet does not have (its output is never decoded).
_REFERENCE_UNET_DROPS = ("conv_norm_out.", "conv_out.")
_SD_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# UNet2DConditionModel arguments that change parameter names or shapes (the rest only change behaviour).
_UNET_SHAPE_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
    "down_block_types", "up_block_types", "mid_block_type", "use_linear_projection",
    "transformer_layers_per_block", "conv_in_kernel", "conv_out_kernel", "time_embedding_type",
    "time_embedding_dim", "time_cond_proj_dim", "class_embed_type", "num_class_embeds",
    "projection_class_embeddings_input_dim", "addition_embed_type", "encoder_hid_dim",
    "encoder_hid_dim_type", "only_cross_attention", "dual_cross_attention",
)


def stock_unet_layout(config: NetConfig) -> dict[str, tuple[int, ...]]:
    """Layout of a plain diffusers ``UNet2DConditionModel`` built from ``config.unet`` (an SD1.5 ``unet/``)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config.unet)
    return {name: tuple(t.shape) for name, t in unet.state_dict().items()}


def init_from_pretrained(config: NetConfig, sd15_unet_dir: str | Path,
                         motion_module_ckpt: str | Path | None = None, *,
                         device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> EmoCASTNet:
    """The untrained networks as training starts: SD1.5 UNet weights in both UNets (the reference UNet
    has no output head), AnimateDiff motion modules in the denoising UNet, fresh init elsewhere."""
    
    unet_dir = _unet_folder(sd15_unet_dir)
    check_unet_config(unet_dir / "config.json", config)
    weights = _unet_weights_file(unet_dir)
    report = compare_layout(stock_unet_layout(config), read_layout(weights))
    if not report.ok:
        raise CheckpointError(weights, "is not the diffusers UNet2DConditionModel of this config", report)

    net = build_net(config, device=device, dtype=dtype)
    own = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    updates: dict[str, torch.Tensor] = {}
    for name, tensor in load_state_dict(weights).items():
        updates[f"{DENOISING_UNET}.{name}"] = tensor
        if not name.startswith(_REFERENCE_UNET_DROPS):
            updates[f"{REFERENCE_UNET}.{name}"] = tensor
    n_sd = len(updates)
    if motion_module_ckpt is not None:
        updates.update(_motion_module_updates(Path(motion_module_ckpt), own))
    n_motion = len(updates) - n_sd

    misplaced = compare_layout({k: own[k] for k in updates if k in own}, updates)
    if misplaced.unexpected or misplaced.mismatched:  # the networks break their own naming contract
        raise RuntimeError("the EmoCAST networks do not match the SD1.5 UNet naming:\n" + format_report(misplaced))
    net.load_state_dict(updates, strict=False)  # copies into the fresh tensors, casting to their dtype
    logger.info("init_from_pretrained: %d tensors from %s (into both UNets), %d from %s, "
                "%d of %d keep their fresh init", n_sd, weights, n_motion,
                motion_module_ckpt or "no motion-module file", len(own) - len(updates), len(own))
    return net


def check_unet_config(config_json: str | Path, config: NetConfig) -> None:
    """Raise ValueError if a diffusers ``unet/config.json`` differs from ``config.unet`` in any field
    that changes tensor names or shapes."""
    config_json = Path(config_json)
    try:
        folder = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the UNet config {config_json}: {exc}") from exc
    defaults = _unet_defaults()
    diffs = []
    for name in _UNET_SHAPE_FIELDS:
        have = _plain(folder.get(name, defaults.get(name)))
        want = _plain(config.unet.get(name, defaults.get(name)))
        if have != want:
            diffs.append(f"{name}: folder has {have!r}, model config has {want!r}")
    if diffs:
        raise ValueError(f"{config_json} does not describe the UNet of the {describe_config(config)} "
                         "(fields that change tensor shapes differ: " + "; ".join(diffs)
                         + "). Use the SD1.5 unet/ folder the model config was written for.")


def _motion_module_updates(path: Path, own: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    prefix = f"{DENOISING_UNET}."
    expected = {k[len(prefix):]: s for k, s in own.items() if k.startswith(prefix) and ".motion_modules." in k}
    if not expected:
        raise ValueError(f"{path}: the model config has no motion modules (use_motion_module is false)")
    report = compare_layout(expected, read_layout(path))
    if not report.ok:
        raise CheckpointError(path, f"is not an AnimateDiff v2 motion-module file for this UNet (expected "
                                    f"{len(expected)} motion-module tensors, e.g. mm_sd_v15_v2.ckpt)", report)
    return {prefix + name: t for name, t in load_state_dict(path).items()}


def _unet_folder(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        return path / "unet"  # the whole SD1.5 repository was given
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers UNet folder (no config.json); pass the SD1.5 "
                                "unet/ folder")
    return path


def _unet_weights_file(unet_dir: Path) -> Path:
    for name in _SD_WEIGHT_NAMES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    raise FileNotFoundError(f"no UNet weights in {unet_dir} (looked for {', '.join(_SD_WEIGHT_NAMES)})")


def _unet_defaults() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    params = pyinspect.signature(UNet2DConditionModel.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not pyinspect.Parameter.empty}


def _plain(value: Any) -> Any:
    """JSON-comparable form: tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
