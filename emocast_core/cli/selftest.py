"""`python -m emocast_core selftest`: tiny models in the real formats, a real photo and synthesised speech
through the whole generate path to an MP4, which is read back and checked (no GPU, no downloads)."""
from __future__ import annotations

import argparse
import math
import tempfile
import time
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..rates import FPS, SAMPLE_RATE
from ..sampling_settings import SamplingSettings
from .generate import generate_from_files
from .table import Arg, arg

SELFTEST_TEXT = "Hello! This is the EmoCAST self test, speaking happily."


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
        return (f"selftest passed: {self.video} ({self.frames} frames at {FPS} fps for {self.duration:.2f} s of "
                f"speech; audio track {self.audio_seconds:.2f} s; {self.seconds:.1f} s in all)")


def selftest(out_dir: str | Path, steps: int = 2, show_progress: bool = True) -> SelftestReport:
    """Tiny models in the real formats, a real photo, synthesised speech -> the whole generate path -> MP4,
    which is then read back and checked."""
    from skimage import data

    from ..testing.speech import synthesize_speech
    from ..testing.tiny_models import TINY_SIZE, write_tiny_models
    from ..video import read_video

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="emocast_selftest_") as tmp:
        tmp = Path(tmp)
        models = write_tiny_models(tmp / "models")
        from PIL import Image
        Image.fromarray(data.astronaut()).save(tmp / "portrait.png")
        speech = synthesize_speech(SELFTEST_TEXT)
        write_wav(tmp / "speech.wav", speech, SAMPLE_RATE)
        video = generate_from_files(models, tmp / "portrait.png", tmp / "speech.wav", "a person talking happily",
                                    out_dir / "selftest.mp4", SamplingSettings(steps=steps), size=TINY_SIZE,
                                    device="cpu", dtype="fp32", show_progress=show_progress)
    frames, fps, audio = read_video(video)
    duration = len(speech) / SAMPLE_RATE
    expected = math.ceil(duration * FPS)
    if frames.shape[0] != expected or audio is None or round(fps) != FPS:
        raise RuntimeError(f"selftest video is wrong: {frames.shape[0]} frames (expected {expected}), fps {fps}, "
                           f"audio {'missing' if audio is None else 'present'}")
    return SelftestReport(video, frames.shape[0], expected, duration, audio.duration,
                          time.perf_counter() - started)


def selftest_args() -> tuple[Arg, ...]:
    return (arg("--out", type=Path, default=Path("selftest_out"), help="folder for selftest.mp4"),
            arg("--steps", type=int, default=2, help="denoising steps per clip"))


def run_selftest(args: argparse.Namespace) -> int:
    print(selftest(args.out, steps=args.steps, show_progress=not args.quiet))
    return 0
