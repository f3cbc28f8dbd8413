"""`python -m emocast_core generate`: portrait, speech and emotion files in, talking-head MP4 out."""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..runtime import PRECISIONS
from ..sampling_settings import SamplingSettings
from .table import Arg, arg

if TYPE_CHECKING:
    from PIL import Image

    from ..sampling import Progress

log = logging.getLogger("emocast_core")


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); EXIF orientation applied (phone portraits are stored sideways); 16-bit images are
    scaled to 8 bits (PIL's own conversion saturates them)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise ValueError(f"the portrait {path} is a folder; give the path of an image file (PNG or JPEG)")
    if not path.is_file():
        raise FileNotFoundError(f"portrait {path} does not exist")
    try:
        with Image.open(path) as img:
            return _rgb8(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as exc:
        raise ValueError(f"the portrait {path} has more pixels than is safe to open ({exc}); scale it down to a "
                         "few thousand pixels a side") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read the portrait {path} as an image ({exc}); use a PNG or JPEG file") from exc


def _rgb8(img: Image.Image) -> np.ndarray:
    if img.mode.startswith("I"):  # 16-bit greyscale ("I;16", "I;16B", ...) or 32-bit integer ("I"): 0..65535
        grey = np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


class TqdmProgress:
    """A progress bar over all denoising steps of all clips."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.total, unit="step", desc="EmoCAST")
        self.bar.set_postfix_str(f"clip {p.clip + 1}/{p.clips}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def generate_from_files(models_dir: str | Path, image: str | Path, audio: str | Path, emotion: str,
                        out: str | Path, settings: SamplingSettings, size: int = 512, crop: bool = True,
                        crossfade: float = 0.5, strength: float = 1.0, device: str = "auto", dtype: str = "auto",
                        net: str | Path | None = None, separate_vocals: bool = True,
                        show_progress: bool = True) -> Path:
    from ..generation_steps import check_settings
    from ..model_paths import ModelPaths
    from ..pipeline import GenerationRequest, generate_video
    from ..preprocess.audio import load_audio
    from ..preprocess.face import validate_portrait
    from ..runtime import EmoCASTModels, resolve_device, resolve_dtype

    # Settings and files first: a typo must not cost minutes of model loading, and nothing is created yet.
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"--out {out} must end in .mp4")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the path of the .mp4 file to write")
    check_settings(settings, size, emotion, crossfade, strength)
    run_dtype = resolve_dtype(dtype, resolve_device(device))  # resolved once: one fp16-on-CPU warning
    portrait = load_image(image)
    validate_portrait(portrait)
    speech = load_audio(audio)
    paths = ModelPaths.resolve(models_dir, net=net)
    started = time.perf_counter()
    models = EmoCASTModels.load(paths, device=device, dtype=run_dtype)
    log.info("models loaded in %.1f s", time.perf_counter() - started)
    request = GenerationRequest(image=portrait, audio=speech, emotion=emotion, size=size, crop=crop,
                                crossfade=crossfade, strength=strength, sampling=settings,
                                separate_vocals=separate_vocals)
    bar = TqdmProgress() if show_progress else None
    try:
        return generate_video(models, request, out, progress=bar)
    finally:
        if bar is not None:
            bar.close()


def generate_args() -> tuple[Arg, ...]:
    s = SamplingSettings
    return (
        arg("--models", type=Path, required=True, metavar="DIR",
            help="model folder: emocast.safetensors (or net.pth), vae/, clip/, wav2vec2/, face_analysis/"),
        arg("--image", type=Path, required=True, help="portrait (PNG / JPEG, any size; the largest face is used)"),
        arg("--audio", type=Path, required=True, help="speech (WAV / MP3 / FLAC / M4A / OGG, any rate or channels)"),
        arg("--emotion", default="a person talking",
            help="emotion text, e.g. 'a person talking happily', or a timeline "
                 "'0: calm and friendly | 4.0: suddenly furious | 9.5: sad' (seconds)"),
        arg("--out", type=Path, required=True, help="output video (.mp4, H.264 + the input speech as AAC)"),
        arg("--steps", type=int, default=s.steps, help=f"DDIM steps per clip (default {s.steps}, as released)"),
        arg("--cfg", type=float, default=s.cfg,
            help=f"classifier-free guidance scale, above 1 (default {s.cfg}, as released)"),
        arg("--seed", type=int, default=s.seed, help=f"random seed (default {s.seed}, as released)"),
        arg("--size", type=int, default=512, help="output size in pixels, a multiple of 64 (default 512)"),
        arg("--clip-length", type=int, default=s.clip_length,
            help=f"frames generated together (default {s.clip_length}, as released)"),
        *(arg(f"--{branch}-weight", type=float, default=weight, help=f"weight of the {what} audio branch "
              f"(default {weight})")
          for branch, what, weight in zip(("pose", "face", "lip"), ("pose (background)", "expression (face)", "lip"),
                                          s.weights)),
        arg("--crossfade", type=float, default=0.5, help="seconds to blend between timeline emotions"),
        arg("--strength", type=float, default=1.0,
            help="EXPERIMENTAL emotion strength: 0 = neutral text, 1 = as released, >1 exaggerates"),
        arg("--no-crop", action="store_true",
            help="resize the whole image instead of cropping a square around the face (the release's behaviour)"),
        arg("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."),
        arg("--dtype", default="auto", choices=PRECISIONS,
            help="precision (auto: fp16 on a GPU, fp32 on the CPU; fp16 on the CPU falls back to fp32 with a "
                 "warning, fp16-force runs fp16 there anyway)"),
        arg("--net", type=Path, help="weights file to use instead of the one in --models"),
        arg("--no-separation", action="store_true",
            help="skip vocal separation even when the model folder has separator/Kim_Vocal_2.onnx"),
    )


def run_generate(args: argparse.Namespace) -> int:
    settings = SamplingSettings(steps=args.steps, cfg=args.cfg, seed=args.seed, clip_length=args.clip_length,
                                weights=(args.pose_weight, args.face_weight, args.lip_weight))
    out = generate_from_files(args.models, args.image, args.audio, args.emotion, args.out, settings,
                              size=args.size, crop=not args.no_crop, crossfade=args.crossfade,
                              strength=args.strength, device=args.device, dtype=args.dtype, net=args.net,
                              separate_vocals=not args.no_separation, show_progress=not args.quiet)
    print(f"wrote {out}")
    return 0
