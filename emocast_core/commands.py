"""The `generate` and `selftest` commands: files in, MP4 out (the CLI's argparse layer is in __main__)."""
from __future__ import annotations

import logging
import math
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .model_paths import ModelPaths
from .pipeline import GenerationRequest, generate_video
from .runtime import EmoCASTModels
from .preprocess.audio import load_audio
from .sampling import Progress, SamplingSettings

log = logging.getLogger("emocast_core")

SELFTEST_TEXT = "Hello! This is the EmoCAST self test, speaking happily."


def load_image(path: str | Path) -> np.ndarray:
    """RGB uint8 (H, W, 3); EXIF orientation applied (phone portraits are stored sideways)."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"portrait {path} does not exist")
    try:
        with Image.open(path) as img:
            return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"cannot read the portrait {path} as an image ({exc}); use a PNG or JPEG file") from exc


class TqdmProgress:
    """A progress bar over all denoising steps of all clips."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, p: Progress) -> None:
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=p.clips * p.steps, unit="step", desc="EmoCAST")
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
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise ValueError(f"output {out} must end in .mp4")
    portrait = load_image(image)  # read the inputs first: a bad file fails before minutes of model loading
    speech = load_audio(audio)
    paths = ModelPaths.resolve(models_dir, net=net)
    started = time.perf_counter()
    models = EmoCASTModels.load(paths, device=device, dtype=dtype)
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


def write_wav(path: Path, samples: np.ndarray, sample_rate: int) -> Path:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


@dataclass
class SelftestReport:
    video: Path
    frames: int
    expected_frames: int
    duration: float
    audio_seconds: float
    seconds: float

    def __str__(self) -> str:
        return (f"selftest passed: {self.video} ({self.frames} frames at 25 fps for {self.duration:.2f} s of "
                f"speech; audio track {self.audio_seconds:.2f} s; {self.seconds:.1f} s in all)")


def selftest(out_dir: str | Path, steps: int = 2, show_progress: bool = True) -> SelftestReport:
    """Tiny models in the real formats, a real photo, synthesised speech -> the whole generate path -> MP4,
    which is then read back and checked."""
    from skimage import data

    from .testing.speech import synthesize_speech
    from .testing.tiny_models import TINY_SIZE, write_tiny_models
    from .video import read_video

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emocast_selftest_") as tmp:
        tmp = Path(tmp)
        models = write_tiny_models(tmp / "models")
        from PIL import Image
        Image.fromarray(data.astronaut()).save(tmp / "portrait.png")
        speech = synthesize_speech(SELFTEST_TEXT)
        write_wav(tmp / "speech.wav", speech, 16000)
        video = generate_from_files(models, tmp / "portrait.png", tmp / "speech.wav", "a person talking happily",
                                    out_dir / "selftest.mp4", SamplingSettings(steps=steps), size=TINY_SIZE,
                                    device="cpu", dtype="fp32", show_progress=show_progress)
    frames, fps, audio = read_video(video)
    duration = len(speech) / 16000
    expected = math.ceil(duration * 25)
    if frames.shape[0] != expected or audio is None or round(fps) != 25:
        raise RuntimeError(f"selftest video is wrong: {frames.shape[0]} frames (expected {expected}), fps {fps}, "
                           f"audio {'missing' if audio is None else 'present'}")
    return SelftestReport(video, frames.shape[0], expected, duration, audio.duration,
                          time.perf_counter() - started)
