"""Model configuration of the EmoCAST networks.

The on-disk format is the one the official release and our reference fixtures use:
``{"unet_config": <diffusers SD1.5 unet/config.json>, "unet_additional_kwargs": {...}, "aux": {...}}``.
Only the fields that change the network are read; the official inference YAML carries more keys
(scheduler, frame counts) that belong to the sampler, not to the model.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class MotionModuleConfig:
    """AnimateDiff v2 temporal transformer settings (``motion_module_kwargs``)."""

    num_attention_heads: int = 8
    max_len: int = 32  # temporal_position_encoding_max_len: length of the stored `pe` buffers


@dataclass(frozen=True)
class FaceLocatorConfig:
    conditioning_embedding_channels: int = 320
    conditioning_channels: int = 3
    block_out_channels: tuple[int, ...] = (16, 32, 64, 128)


@dataclass(frozen=True)
class FaceProjectionConfig:
    """ArcFace identity embedding -> face tokens (official ``ImageProjModel``)."""

    identity_dim: int = 512
    tokens: int = 4
    token_dim: int = 768


@dataclass(frozen=True)
class AudioProjectionConfig:
    """wav2vec2 window -> audio tokens (official ``AudioProjModel``)."""

    window: int = 5  # frames i-2..i+2
    layers: int = 12  # wav2vec2 hidden states 1..12
    channels: int = 768
    intermediate_dim: int = 512
    output_dim: int = 768
    context_tokens: int = 32


@dataclass(frozen=True)
class NetConfig:
    """Everything that determines the parameter layout and the forward pass of the five networks."""

    unet: dict[str, Any]
    motion: MotionModuleConfig = field(default_factory=MotionModuleConfig)
    use_motion_module: bool = True
    use_audio_module: bool = True
    audio_attention_dim: int = 768  # width of the audio and emotion-text tokens
    emotion_audio_head_dim: int = 80  # attn_audioemo: heads x 80 (hard-coded in the official block)
    face_locator: FaceLocatorConfig = field(default_factory=FaceLocatorConfig)
    face_projection: FaceProjectionConfig = field(default_factory=FaceProjectionConfig)
    audio_projection: AudioProjectionConfig = field(default_factory=AudioProjectionConfig)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "NetConfig":
        if not isinstance(data, dict) or "unet_config" not in data:
            raise ValueError("model config has no 'unet_config' section (expected a JSON object in the official "
                             "layout: unet_config / unet_additional_kwargs / aux)")
        _check_sections(data)
        try:
            config = cls._from_sections(data)
            _check_field_types(config)
            return config
        except (TypeError, AttributeError, KeyError) as exc:
            raise ValueError(f"model config has a value of the wrong kind ({type(exc).__name__}: {exc}); use the "
                             "config.json that came with the weights") from exc

    @classmethod
    def _from_sections(cls, data: dict[str, Any]) -> "NetConfig":
        extra = data.get("unet_additional_kwargs", {})
        _check_supported(extra)
        mm = extra.get("motion_module_kwargs", {})
        aux = data.get("aux", {})
        fl = aux.get("face_locator", {})
        ip = aux.get("image_proj", {})
        ap = aux.get("audio_proj", {})
        unet = {k: v for k, v in data["unet_config"].items() if not k.startswith("_")}
        return cls(
            unet=unet,
            motion=MotionModuleConfig(
                num_attention_heads=mm.get("num_attention_heads", 8),
                max_len=mm.get("temporal_position_encoding_max_len", 32),
            ),
            use_motion_module=extra.get("use_motion_module", True),
            use_audio_module=extra.get("use_audio_module", True),
            audio_attention_dim=extra.get("audio_attention_dim", 768),
            face_locator=FaceLocatorConfig(
                conditioning_embedding_channels=fl.get("conditioning_embedding_channels", 320),
                conditioning_channels=fl.get("conditioning_channels", 3),
                block_out_channels=tuple(fl.get("block_out_channels", (16, 32, 64, 128))),
            ),
            face_projection=FaceProjectionConfig(
                identity_dim=ip.get("clip_embeddings_dim", 512),
                tokens=ip.get("clip_extra_context_tokens", 4),
                token_dim=unet.get("cross_attention_dim", 768),
            ),
            audio_projection=AudioProjectionConfig(
                window=ap.get("seq_len", 5),
                layers=ap.get("blocks", 12),
                channels=ap.get("channels", 768),
                intermediate_dim=ap.get("intermediate_dim", 512),
                output_dim=ap.get("output_dim", 768),
                context_tokens=ap.get("context_tokens", 32),
            ),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> "NetConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read model config {path}: {exc}") from exc
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc

    @classmethod
    def builtin(cls, name: str) -> "NetConfig":
        """``full`` (the released model) or ``tiny`` (random-weight tests)."""
        try:
            text = resources.files("emocast_core.configs").joinpath(f"{name}.json").read_text("utf-8")
        except FileNotFoundError as exc:
            raise ValueError(f"no built-in model config named {name!r} (choose 'full' or 'tiny')") from exc
        return cls.from_dict(json.loads(text))

    @classmethod
    def full(cls) -> "NetConfig":
        return cls.builtin("full")

    @classmethod
    def tiny(cls) -> "NetConfig":
        return cls.builtin("tiny")

    def to_dict(self) -> dict[str, Any]:
        """The official layout, so that our files are read by the same loader as theirs."""
        return {
            "unet_config": {"_class_name": "UNet2DConditionModel", **copy.deepcopy(self.unet)},
            "unet_additional_kwargs": {
                "use_motion_module": self.use_motion_module,
                "use_audio_module": self.use_audio_module,
                "motion_module_kwargs": {
                    "num_attention_heads": self.motion.num_attention_heads,
                    "num_transformer_block": 1,
                    "attention_block_types": ["Temporal_Self", "Temporal_Self"],
                    "temporal_position_encoding": True,
                    "temporal_position_encoding_max_len": self.motion.max_len,
                    "temporal_attention_dim_div": 1,
                },
                "audio_attention_dim": self.audio_attention_dim,
            },
            "aux": {
                "face_locator": {
                    "conditioning_embedding_channels": self.face_locator.conditioning_embedding_channels,
                    "conditioning_channels": self.face_locator.conditioning_channels,
                    "block_out_channels": list(self.face_locator.block_out_channels),
                },
                "image_proj": {
                    "clip_embeddings_dim": self.face_projection.identity_dim,
                    "clip_extra_context_tokens": self.face_projection.tokens,
                },
                "audio_proj": {
                    "seq_len": self.audio_projection.window,
                    "blocks": self.audio_projection.layers,
                    "channels": self.audio_projection.channels,
                    "intermediate_dim": self.audio_projection.intermediate_dim,
                    "output_dim": self.audio_projection.output_dim,
                    "context_tokens": self.audio_projection.context_tokens,
                },
            },
        }

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2), encoding="utf-8")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def num_heads(self) -> int:
        """SD1.5's ``attention_head_dim`` is, historically, the number of heads."""
        return int(self.unet.get("num_attention_heads") or self.unet["attention_head_dim"])

    @property
    def context_dim(self) -> int:
        return int(self.unet.get("cross_attention_dim", 768))


def _check_field_types(config: "NetConfig") -> None:
    """Numbers where numbers belong: each field of the sub-configs has the type of its default."""
    for part in (config, config.motion, config.face_locator, config.face_projection, config.audio_projection):
        for f in fields(part):
            value, default = getattr(part, f.name), f.default
            if isinstance(default, (bool, int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"model config value {f.name}={value!r} must be a number")
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"model config value {f.name}={value!r} must be true or false")


def _check_sections(data: dict[str, Any]) -> None:
    """Each section the loader reads must be a JSON object (a list or a number there is someone else's file)."""
    sections = {"unet_config": data["unet_config"], "unet_additional_kwargs": data.get("unet_additional_kwargs", {}),
                "aux": data.get("aux", {})}
    extra, aux = sections["unet_additional_kwargs"], sections["aux"]
    if isinstance(extra, dict):
        sections["unet_additional_kwargs.motion_module_kwargs"] = extra.get("motion_module_kwargs", {})
    if isinstance(aux, dict):
        sections.update({f"aux.{k}": aux.get(k, {}) for k in ("face_locator", "image_proj", "audio_proj")})
    for name, value in sections.items():
        if not isinstance(value, dict):
            raise ValueError(f"model config section {name!r} must be a JSON object, got {type(value).__name__}")
    unet = data["unet_config"]
    for key in ("block_out_channels", "down_block_types", "up_block_types"):
        if key in unet and not isinstance(unet[key], list):
            raise ValueError(f"model config unet_config.{key} must be a list, got {type(unet[key]).__name__}")


def _check_supported(extra: dict[str, Any]) -> None:
    """Refuse settings whose code paths the released model never used (and we do not implement)."""
    unsupported = {
        "unet_use_cross_frame_attention": False,
        "unet_use_temporal_attention": False,
        "motion_module_decoder_only": False,
    }
    for key, wanted in unsupported.items():
        if extra.get(key, wanted) != wanted:
            raise ValueError(f"unet_additional_kwargs.{key}={extra[key]!r} is not supported "
                             f"(the EmoCAST release uses {wanted!r})")
    mm = extra.get("motion_module_kwargs", {})
    if mm.get("num_transformer_block", 1) != 1 or mm.get("temporal_attention_dim_div", 1) != 1:
        raise ValueError("motion modules with more than one transformer block or a reduced attention "
                         "width are not supported (the EmoCAST release uses 1 and 1)")
    if mm.get("attention_block_types", ["Temporal_Self", "Temporal_Self"]) != ["Temporal_Self",
                                                                                 "Temporal_Self"]:
        raise ValueError("motion modules must use two Temporal_Self attention blocks (AnimateDiff v2)")
    if extra.get("motion_module_resolutions", [1, 2, 4, 8]) != [1, 2, 4, 8] or \
            not extra.get("motion_module_mid_block", True):
        raise ValueError("motion modules must sit at every resolution and in the mid block, as released")
