"""Single-file checkpoints as ComfyUI keeps them, loaded into the models EmoCAST runs.

ComfyUI users already have the VAE, the CLIP-L text encoder and often wav2vec2 as one weights file each
(``models/vae/``, ``models/text_encoders/``, ``models/audio_encoders/``), without the Hugging Face config
files the EmoCAST model folder carries. The architectures are fixed by the release (sd-vae-ft-mse, CLIP
ViT-L/14, wav2vec2-base-960h), so their configurations are written here and only the weights are read.

Formats accepted:

* VAE: the original LDM layout (``encoder.down.0.block.0...``, optionally under ``first_stage_model.`` or
  ``vae.``), converted with diffusers' own converter, or an already-diffusers state dict.
* CLIP: the Hugging Face ``CLIPTextModel`` state dict (``text_model.*``), optionally under
  ``cond_stage_model.transformer.`` or ``transformer.``; a ``text_projection`` / ``logit_scale`` is ignored.
* wav2vec2: the Hugging Face ``Wav2Vec2Model`` state dict (what ComfyUI's audio encoder loader reads),
  optionally under ``wav2vec2.`` (a ``Wav2Vec2ForCTC`` file, its ``lm_head`` ignored), with the positional
  convolution's weight norm saved either as ``weight_g``/``weight_v`` or as ``parametrizations``.

Nothing here downloads anything.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import (CLIPTextConfig, CLIPTextModel, CLIPTokenizer, Wav2Vec2Config, Wav2Vec2FeatureExtractor,
                          Wav2Vec2Model)

from .checkpoints import load_state_dict
from .emotion import EmotionTextEncoder
from .preprocess.audio_features import Wav2Vec2AudioEncoder
from .rates import SAMPLE_RATE

# stabilityai/sd-vae-ft-mse
SD_VAE_CONFIG: Mapping[str, Any] = MappingProxyType({
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "norm_num_groups": 32, "act_fn": "silu", "sample_size": 256,
    "scaling_factor": 0.18215, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
})

# the text tower of openai/clip-vit-large-patch14 (token ids as in its config.json)
CLIP_L_TEXT_CONFIG: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
    "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5,
    "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
})

# facebook/wav2vec2-base-960h (the parts that shape the network; dropouts do not matter in eval)
WAV2VEC2_BASE_CONFIG: Mapping[str, Any] = MappingProxyType({
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
    "hidden_act": "gelu", "layer_norm_eps": 1e-5, "feat_extract_norm": "group", "feat_extract_activation": "gelu",
    "conv_dim": (512,) * 7, "conv_stride": (5, 2, 2, 2, 2, 2, 2), "conv_kernel": (10, 3, 3, 3, 3, 2, 2),
    "conv_bias": False, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "do_stable_layer_norm": False, "vocab_size": 32,
})

_CLIP_PREFIXES = ("cond_stage_model.transformer.", "transformer.")
_CLIP_IGNORED = ("text_projection.weight", "logit_scale", "text_model.embeddings.position_ids")
_WAV2VEC2_IGNORED_PREFIXES = ("lm_head.", "quantizer.", "project_q.", "project_hid.")
_WAV2VEC2_OPTIONAL = ("masked_spec_embed",)  # a training-time parameter, unused by EmoCAST
_WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


def load_vae_file(path: str | Path, dtype: torch.dtype = torch.float32,
                  config: Mapping[str, Any] | None = None) -> AutoencoderKL:
    """An SD VAE single file (LDM or diffusers key layout) as a diffusers `AutoencoderKL` (on the CPU)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = dict(SD_VAE_CONFIG if config is None else config)
    state = load_state_dict(path)
    if not any(k.startswith("encoder.down_blocks.") for k in state):
        try:
            state = convert_ldm_vae_checkpoint(state, config)
        except (KeyError, IndexError, ValueError, RuntimeError) as err:
            raise ValueError(f"{path} is not an SD1.5 VAE in the LDM or diffusers layout (converting its keys "
                             f"failed: {err!r}); choose the matching file, or use the model folder's vae/") from err
    vae = AutoencoderKL(**config)
    _load_strict(vae, state, path, "an SD1.5 VAE (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    if dtype != torch.float32:  # built in fp32, like the folder form before its cast
        vae = vae.to(dtype)
    return vae.eval().requires_grad_(False)


def load_clip_text_file(path: str | Path, tokenizer_dir: str | Path, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu",
                        config: Mapping[str, Any] | None = None) -> EmotionTextEncoder:
    """A CLIP-L text-encoder single file (e.g. ComfyUI's clip_l.safetensors) and the tokenizer files in
    `tokenizer_dir` (vocab.json + merges.txt) as an `EmotionTextEncoder`."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "vocab.json").is_file() or not (tokenizer_dir / "merges.txt").is_file():
        raise FileNotFoundError(f"no CLIP tokenizer in {tokenizer_dir}: expected vocab.json and merges.txt "
                                "(ComfyUI ships them in comfy/sd1_tokenizer)")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model = CLIPTextModel(CLIPTextConfig(**(CLIP_L_TEXT_CONFIG if config is None else config)))
    state = _clip_state(load_state_dict(path), nested=any(k.startswith("text_model.") for k in model.state_dict()))
    _load_strict(model, state, path, "a CLIP-L text encoder (e.g. clip_l.safetensors)")
    # fp32 first and cast afterwards, as the folder form loads
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return EmotionTextEncoder(tokenizer, model)


def _clip_state(state: dict[str, torch.Tensor], nested: bool) -> dict[str, torch.Tensor]:
    """The text-model tensors named as this transformers version's `CLIPTextModel` names them: under
    ``text_model.`` (4.x, and the files) or not (5.x)."""
    for prefix in _CLIP_PREFIXES:
        if any(k.startswith(prefix + "text_model.") for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items() if k not in _CLIP_IGNORED}
    if any(k.startswith("text_model.") for k in state) and not nested:
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    elif nested:
        state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.endswith("embeddings.position_ids")}


def load_wav2vec2_file(path: str | Path, device: str | torch.device = "cpu",
                       config: Mapping[str, Any] | None = None) -> Wav2Vec2AudioEncoder:
    """A wav2vec2-base single file (ComfyUI's audio encoder format) as a `Wav2Vec2AudioEncoder` (fp32, with
    wav2vec2-base-960h's feature extractor: 16 kHz, normalised)."""
    state = load_state_dict(path)
    if any(k.startswith("wav2vec2.") for k in state):
        state = {k.removeprefix("wav2vec2."): v for k, v in state.items() if k.startswith("wav2vec2.")}
    state = {k: v for k, v in state.items() if not k.startswith(_WAV2VEC2_IGNORED_PREFIXES)}
    model = Wav2Vec2Model(Wav2Vec2Config(**(WAV2VEC2_BASE_CONFIG if config is None else config)))
    state = _match_weight_norm_names(state, set(model.state_dict()))
    _load_strict(model, state, path, "a wav2vec2-base model (e.g. facebook/wav2vec2-base-960h)",
                 optional=_WAV2VEC2_OPTIONAL)
    processor = Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                                         return_attention_mask=False)
    return Wav2Vec2AudioEncoder(model.to(device), processor)


def _match_weight_norm_names(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Rename weight-norm tensors to the naming this transformers version uses (old ``weight_g``/``weight_v``
    or ``parametrizations.weight.original0/1``): the same tensors, saved by different torch versions."""
    swaps = [(a, b) for old, new in _WEIGHT_NORM_NAMES.items() for a, b in ((old, new), (new, old))]
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in wanted:
            key = next((key.replace(a, b) for a, b in swaps if a in key and key.replace(a, b) in wanted), key)
        out[key] = value
    return out


def _load_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], path: str | Path, expected: str,
                 optional: tuple[str, ...] = ()) -> None:
    """Load every weight or fail naming the file, what it should be, and a few of the keys at fault."""
    own = module.state_dict()
    missing = [k for k in own if k not in state and k not in optional]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [f"{k} {tuple(state[k].shape)} (expected {tuple(own[k].shape)})"
                   for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong_shape:
        problems = [f"{len(items)} {what}: {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
                    for what, items in (("missing", missing), ("unexpected", unexpected),
                                        ("with the wrong shape", wrong_shape)) if items]
        raise ValueError(f"{path} is not {expected}: its weights do not match ({'; '.join(problems)}). Choose "
                         "the matching file, or use the model folder's own sub-folder instead")
    module.load_state_dict(dict(state), strict=not optional)
