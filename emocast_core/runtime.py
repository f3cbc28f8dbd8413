"""The loaded models and where they run: the model bundle, device and precision choice, ONNX Runtime
providers, and moving the torch parts between devices.

Everything that generates (the generation steps, the pipeline, the benchmark, the ComfyUI nodes) starts
from an `EmoCASTModels`; this module sits below all of them and imports only the loaders of the parts.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler
from diffusers.utils import is_accelerate_available

from .checkpoints import load_net, parse_dtype
from .emotion import EmotionTextEncoder
from .model_paths import ModelPaths
from .models.net import EmoCASTNet
from .preprocess.audio import VocalSeparator
from .preprocess.audio_features import Wav2Vec2AudioEncoder
from .preprocess.face import FaceAnalyzer
from .preprocess.vocal_separation import find_separator
from .scheduler import make_scheduler
from .single_file import load_clip_text_file, load_vae_file, load_wav2vec2_file

# The choices a user has for the precision; "auto" is resolved by `resolve_dtype`. "fp16" on the CPU falls
# back to fp32 (with a warning); "fp16-force" runs fp16 wherever it is asked for.
FORCED_FP16 = "fp16-force"
PRECISIONS = ("auto", "fp32", "fp16", "bf16", FORCED_FP16)
# The torch modules of EmoCASTModels that can change device (the face analyzer is ONNX Runtime).
MOVABLE_PARTS = ("net", "vae", "text_encoder", "audio_encoder")

log = logging.getLogger(__name__)

__all__ = ["EmoCASTModels", "FORCED_FP16", "MOVABLE_PARTS", "PRECISIONS", "move_models", "onnx_providers",
           "parameter_bytes", "part_modules", "resolve_device", "resolve_dtype"]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} was asked for but torch sees no CUDA GPU; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"device {str(device)!r} was asked for but torch sees {torch.cuda.device_count()} CUDA "
                         "GPU(s), numbered from 0")
    return device


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """'auto': fp16 on a GPU (what the release runs), fp32 on the CPU (where fp16 is slow or unsupported).
    'fp16' on the CPU also gives fp32, with a warning; 'fp16-force' (or a torch.dtype) is taken as it is."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in PRECISIONS:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(PRECISIONS)}")
    if dtype == FORCED_FP16:
        return torch.float16
    if dtype == "fp16" and device.type == "cpu":
        log.warning("fp16 on the CPU is many times slower than fp32 (CPUs have little or no fp16 arithmetic): "
                    "using fp32; choose the precision %r (--dtype %s) to run fp16 on the CPU anyway",
                    FORCED_FP16, FORCED_FP16)
        return torch.float32
    return parse_dtype(dtype)


def onnx_providers(device: torch.device) -> tuple[str, ...]:
    """ONNX Runtime providers for the face and separator models: CUDA first when the run is on a GPU and
    the installed onnxruntime has it (the CPU-only package does not), the CPU always."""
    import onnxruntime

    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider") if device.type == "cuda" else ("CPUExecutionProvider",)
    available = set(onnxruntime.get_available_providers())
    return tuple(p for p in wanted if p in available) or ("CPUExecutionProvider",)


@dataclass
class EmoCASTModels:
    """Every model the pipeline needs, loaded once and reused across generations."""

    net: EmoCASTNet
    vae: AutoencoderKL
    text_encoder: EmotionTextEncoder
    audio_encoder: Wav2Vec2AudioEncoder
    face_analyzer: FaceAnalyzer
    scheduler: DDIMScheduler
    device: torch.device
    dtype: torch.dtype
    separator: VocalSeparator | None = None  # present when the model folder has separator/*.onnx

    @classmethod
    def load(cls, paths: ModelPaths, device: str | torch.device | None = None,
             dtype: str | torch.dtype | None = None) -> "EmoCASTModels":
        device = resolve_device(device)
        dtype = resolve_dtype(dtype, device)
        net = load_net(paths.net, paths.config, device=device, dtype=dtype)
        net.requires_grad_(False)
        if paths.vae_file is not None:
            vae = load_vae_file(paths.vae_file, dtype=dtype).to(device)
        else:
            with _folder_load("VAE", paths.vae, "https://huggingface.co/stabilityai/sd-vae-ft-mse"):
                # low_cpu_mem_usage needs accelerate (installed with the train extra only, not a runtime
                # dependency: the VAE is small). Saying so explicitly spares every load diffusers' warning
                # that it fell back to the ordinary loading without it.
                vae = AutoencoderKL.from_pretrained(paths.vae, local_files_only=True, torch_dtype=dtype,
                                                    low_cpu_mem_usage=is_accelerate_available()).to(device)
        vae.requires_grad_(False)
        if paths.clip_file is not None:
            text = load_clip_text_file(paths.clip_file, paths.tokenizer_dir, device=device, dtype=dtype)
        else:
            with _folder_load("CLIP text encoder", paths.clip, "https://huggingface.co/openai/clip-vit-large-patch14"):
                text = EmotionTextEncoder.from_pretrained(paths.clip, device=device, dtype=dtype)
        if paths.wav2vec2_file is not None:
            audio = load_wav2vec2_file(paths.wav2vec2_file, device=device)
        else:
            with _folder_load("wav2vec2", paths.wav2vec2, "https://huggingface.co/facebook/wav2vec2-base-960h"):
                audio = Wav2Vec2AudioEncoder.from_pretrained(paths.wav2vec2, device=device)  # fp32, as released
        providers = onnx_providers(device)
        face = FaceAnalyzer.from_folder(paths.face_analysis, providers=providers)
        separator = find_separator(paths.root, providers=providers)
        return cls(net, vae, text, audio, face, make_scheduler(), device, dtype, separator)


@contextmanager
def _folder_load(what: str, folder: Path, source: str) -> Iterator[None]:
    """A model folder that diffusers / transformers cannot load (broken or mismatched weights, a bad config)
    becomes one error naming the folder, instead of the library's own wording."""
    try:
        yield
    except Exception as exc:  # safetensors / torch / JSON / library errors: the files are broken
        if isinstance(exc, (FileNotFoundError, ValueError)) and str(folder) in str(exc):
            raise  # our own message, which names the folder and what is missing already
        raise ValueError(f"the {what} in {folder} cannot be loaded ({type(exc).__name__}: {exc}); replace the "
                         f"folder with the original files from {source}") from exc


def _modules(models: EmoCASTModels, parts: Iterable[str]) -> list[torch.nn.Module]:
    unknown = set(parts) - set(MOVABLE_PARTS)
    if unknown:
        raise ValueError(f"unknown model part(s) {sorted(unknown)}; choose from {', '.join(MOVABLE_PARTS)}")
    table = {"net": models.net, "vae": models.vae, "text_encoder": models.text_encoder.text_model,
             "audio_encoder": models.audio_encoder.model}
    return [table[p] for p in parts]


def part_modules(models: EmoCASTModels, parts: Iterable[str] = MOVABLE_PARTS) -> dict[str, torch.nn.Module]:
    """The torch module behind each named part, e.g. to hand the weights to a host's memory manager."""
    parts = tuple(parts)
    return dict(zip(parts, _modules(models, parts)))


def move_models(models: EmoCASTModels, device: str | torch.device, parts: Iterable[str] = MOVABLE_PARTS) -> None:
    """Move the named torch modules (weights only; dtypes unchanged), e.g. to the CPU between runs.

    `models.device` stays the compute device: move the parts back there before using them."""
    for module in _modules(models, parts):
        module.to(device)


def parameter_bytes(models: EmoCASTModels, parts: Iterable[str] = MOVABLE_PARTS) -> int:
    """Memory taken by the weights and buffers of the named parts."""
    return sum(t.numel() * t.element_size() for m in _modules(models, parts)
               for t in (*m.parameters(), *m.buffers()))
