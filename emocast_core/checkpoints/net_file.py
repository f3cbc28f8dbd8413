"""The EmoCAST networks' weights file: its expected layout, the strict check, loading and conversion.

The released weights are one ``net.pth``: the strict ``state_dict()`` of a container with five children
(``reference_unet``, ``denoising_unet``, ``face_locator``, ``imageproj``, ``audioproj``). We also write and
read a single-file safetensors form of the same dictionary, with the model config as metadata.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping

import torch

from ..config import NetConfig
from ..models.net import PREFIXES, EmoCASTNet, build_net
from .files import (CheckpointError, cast_floating, existing_file, is_safetensors, load_state_dict,
                    parse_dtype, read_layout, read_metadata, save_safetensors)
from .layout import compare_layout, group_keys

logger = logging.getLogger(__name__)

# The safetensors metadata entry that carries the model config (JSON in the release's layout).
CONFIG_METADATA_KEY = "emocast_config"


def expected_layout(config: NetConfig) -> dict[str, tuple[int, ...]]:
    """The exact ``state_dict`` layout (parameters + persistent buffers) of the networks for `config`."""
    net = build_net(config, device="meta")
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def check_layout(path: str | Path, layout: Mapping[str, Any], config: NetConfig,
                 expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise :class:`CheckpointError` unless `layout` is exactly the EmoCAST layout for `config`
    (`expected`: that layout, when the caller has already built it)."""
    expected = expected_layout(config) if expected is None else expected
    report = compare_layout(expected, layout)
    if report.ok:
        return
    problem = (f"does not match the {describe_config(config)} (expected {len(expected)} tensors, "
               f"the file has {len(layout)}: {len(report.missing)} missing, {len(report.unexpected)} "
               f"unexpected, {len(report.mismatched)} with another shape).")
    if not any(name.split(".", 1)[0] in PREFIXES for name in layout):
        problem += (" None of its keys starts with " + "/".join(f"{m}." for m in PREFIXES)
                    + ": this is not an EmoCAST net.pth (a bare SD UNet or motion-module file?).")
    else:
        other = _matching_builtin(layout, config)
        problem += (f" It matches the {other} instead: use that config (as config.json in the model folder, or "
                    "--config / --tiny for convert and inspect)." if other else
                    " Use the official net.pth (or a file converted from it), or the model config these weights "
                    "were trained with (config.json in the model folder, or --config for convert and inspect).")
    raise CheckpointError(path, problem, report)


def _matching_builtin(layout: Mapping[str, Any], config: NetConfig) -> str | None:
    """Name of a built-in config other than `config` whose layout `layout` has, if any."""
    for builtin in (NetConfig.full(), NetConfig.tiny()):
        if builtin != config and compare_layout(expected_layout(builtin), layout).ok:
            return describe_config(builtin)
    return None


def describe_config(config: NetConfig) -> str:
    if config == NetConfig.full():
        return "full-size EmoCAST config"
    if config == NetConfig.tiny():
        return "tiny test config"
    unet = config.unet
    return (f"custom config (block_out_channels={list(unet.get('block_out_channels', []))}, "
            f"layers_per_block={unet.get('layers_per_block')})")


def resolve_config(path: str | Path, config: NetConfig | str | Path | None = None) -> NetConfig:
    """The model config for a weights file: the one given, else the one stored in the file, else full size."""
    if isinstance(config, NetConfig):
        return config
    if config is not None:
        return NetConfig.from_json(config)
    stored = read_metadata(path).get(CONFIG_METADATA_KEY)
    if stored:
        try:
            return NetConfig.from_dict(json.loads(stored))
        except (json.JSONDecodeError, ValueError) as exc:
            raise CheckpointError(path, f"carries an unreadable {CONFIG_METADATA_KEY} metadata entry: {exc}") from exc
    return NetConfig.full()


def load_net(path: str | Path, config: NetConfig | str | Path | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> EmoCASTNet:
    """Build the networks and load a ``net.pth`` / converted safetensors file into them, strictly.

    The layout is checked first (grouped error); then every floating tensor is cast to `dtype` and
    assigned to the meta-built networks (no random init of 2.5 B parameters that would be overwritten).
    """
    path = existing_file(path)
    config = resolve_config(path, config)
    net = build_net(config, device="meta")
    check_layout(path, read_layout(path), config, {n: tuple(t.shape) for n, t in net.state_dict().items()})
    state = {name: cast_floating(t, dtype) for name, t in load_state_dict(path, device).items()}
    net.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left_on_meta:
        # Non-persistent buffers are not in any file; build_net must not create them lazily on meta.
        raise RuntimeError(f"loading {path} left tensors without data (not part of the state dict): "
                           + ", ".join(g.pattern for g in group_keys(left_on_meta)))
    return net


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | str | None = None,
            config: NetConfig | str | Path | None = None) -> Path:
    """``net.pth`` (or any EmoCAST weights file) -> single-file safetensors carrying the model config.

    The source layout is checked first, so the output always loads with :func:`load_net`.
    `dtype` None keeps the stored dtypes (a bit-identical copy).
    """
    src, dst = existing_file(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"convert: source and destination are the same file ({src}); choose another output")
    if not is_safetensors(dst):
        raise ValueError(f"convert: the output {dst} must end in .safetensors")
    if dst.is_dir():
        raise ValueError(f"convert: the output {dst} is a folder; give the path of the .safetensors file to write")
    config = resolve_config(src, config)
    check_layout(src, read_layout(src), config)
    state = load_state_dict(src)
    save_safetensors(state, dst, dtype, metadata={CONFIG_METADATA_KEY: json.dumps(config.to_dict())})
    logger.info("wrote %s (%d tensors, %s)", dst, len(state), parse_dtype(dtype) or "stored dtypes")
    return dst
