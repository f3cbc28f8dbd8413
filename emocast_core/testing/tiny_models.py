"""A complete model folder with tiny random weights, in exactly the real file formats.

`write_tiny_models(folder)` lays out what `ModelPaths.resolve` expects (emocast.safetensors + config.json,
diffusers `vae/`, HF `clip/` and `wav2vec2/`, insightface ONNX models), so the real loading code runs
end to end with no download and no GPU. The tiny sizes follow the official tiny test configuration.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import CONFIG_METADATA_KEY, save_safetensors
from ..rates import SAMPLE_RATE
from ..config import NetConfig
from ..models.net import build_net
from .face_models import write_face_models

TINY_SIZE = 128  # pixels; the tiny UNet's deepest level is then 2x2


def _randomise(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Small random values everywhere, zero-initialised branches included, so every path contributes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "ff_norm.weight",
                              "norms.0.weight", "norms.1.weight", "postnorm_audioemo.weight")):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _save_pretrained(model, folder: Path) -> None:
    """`save_pretrained`, then the weights get the umask's permissions like every other file: safetensors
    writes them through a temporary file of mode 0600, which another user of a shared model folder (a ComfyUI
    service account) could not read. config.json, written with a plain open, has the umask's mode."""
    model.save_pretrained(folder)
    mode = os.stat(folder / "config.json").st_mode & 0o777
    for weights in folder.glob("*.safetensors"):
        weights.chmod(mode)


def write_net(folder: Path, seed: int = 0) -> Path:
    config = NetConfig.tiny()
    net = build_net(config, zero_init=False)
    _randomise(net, seed)
    config.to_json(folder / "config.json")
    return save_safetensors(net.state_dict(), folder / "emocast.safetensors",
                            metadata={CONFIG_METADATA_KEY: json.dumps(config.to_dict())})


def write_vae(folder: Path) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(1)
    vae = AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                        latent_channels=4, sample_size=TINY_SIZE,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    _save_pretrained(vae, folder)
    return folder


def write_clip(folder: Path) -> Path:
    """A 1-layer CLIP text model (width 768, as the UNets' cross-attention expects) and a byte-level BPE
    tokenizer with a handful of merges, saved as an HF folder."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    alphabet = sorted(ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges = [("t", "h"), ("th", "e</w>"), ("i", "n"), ("a", "n"), ("e", "r"), ("o", "n")]
    tokens += ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n",
                                       encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(2)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=768, intermediate_size=64, num_hidden_layers=1,
                            num_attention_heads=2, max_position_embeddings=77,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    _save_pretrained(CLIPTextModel(config), folder)
    return folder


def write_wav2vec2(folder: Path) -> Path:
    """Hidden width 8 and 2 layers: what the tiny audio projection takes (window 5 x 2 layers x 8)."""
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    torch.manual_seed(3)
    config = Wav2Vec2Config(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
                            conv_dim=(16,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                            feat_extract_norm="group", do_stable_layer_norm=False)
    _save_pretrained(Wav2Vec2Model(config), folder)
    Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SAMPLE_RATE, padding_value=0.0, do_normalize=True,
                             return_attention_mask=False).save_pretrained(folder)
    return folder


def write_tiny_models(folder: str | Path, seed: int = 0, separator: bool = False) -> Path:
    """Write the whole tiny model folder (with an identity vocal separator when asked); returns it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_net(folder, seed)
    write_vae(folder / "vae")
    write_clip(folder / "clip")
    write_wav2vec2(folder / "wav2vec2")
    write_face_models(folder / "face_analysis")
    if separator:
        from .separator_model import write_identity_mdx
        (folder / "separator").mkdir(exist_ok=True)
        write_identity_mdx(folder / "separator" / "Kim_Vocal_2.onnx")
    return folder
