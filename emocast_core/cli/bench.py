"""`python -m emocast_core bench` (or `python -m emocast_core.bench`): the emotive sampler's seconds per
generated frame, network evaluations and peak memory.

    python -m emocast_core.bench                     # tiny random model on the CPU (seconds)
    python -m emocast_core.bench --full --size 512   # the released sizes, random weights (use a GPU)

The conditioning is random (no face, audio or text models are involved): this measures the sampler,
i.e. the ReferenceNet, the denoising UNet and the VAE, which is where the time goes.
"""
from __future__ import annotations

import argparse
import resource
import time
from dataclasses import dataclass

import torch

from ..config import NetConfig
from ..emotion import EmotionSchedule, EmotionKey
from ..models.net import build_net
from ..preprocess.audio_features import AudioFeatures
from ..rates import FPS
from ..runtime import PRECISIONS, resolve_device, resolve_dtype
from ..sampling import SamplerInputs, generate_frames
from ..sampling_settings import SamplingSettings
from ..scheduler import make_scheduler
from .table import Arg, arg


@dataclass
class BenchResult:
    frames: int
    seconds: float
    denoising_calls: int
    reference_calls: int
    peak_rss_mb: float
    peak_cuda_mb: float | None

    def report(self) -> str:
        lines = [
            f"frames generated:               {self.frames}",
            f"seconds per frame:              {self.seconds / self.frames:.3f}",
            f"denoising UNet calls per frame: {self.denoising_calls / self.frames:.3f} (each a CFG batch of 2)",
            f"ReferenceNet calls per frame:   {self.reference_calls / self.frames:.3f}",
            f"peak RSS:                       {self.peak_rss_mb:.0f} MB",
        ]
        if self.peak_cuda_mb is not None:
            lines.append(f"peak CUDA memory allocated:     {self.peak_cuda_mb:.0f} MB")
        return "\n".join(lines)


def _vae(full: bool, size: int):
    from diffusers import AutoencoderKL

    if full:  # the SD VAE architecture (sd-vae-ft-mse)
        return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                             down_block_types=("DownEncoderBlock2D",) * 4,
                             up_block_types=("UpDecoderBlock2D",) * 4, sample_size=size)
    return AutoencoderKL(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         sample_size=size)


def _conditioning(config: NetConfig, size: int, frames: int, clip_length: int) -> SamplerInputs:
    g = torch.Generator().manual_seed(0)
    latent = size // 8
    levels = [latent // 2 ** i for i in range(len(config.unet["block_out_channels"]))]
    ap = config.audio_projection
    padded = -(-frames // clip_length) * clip_length
    text = torch.randn(1, 77, config.context_dim, generator=g)
    emotion = EmotionSchedule(per_frame=text.expand(frames, -1, -1), prompt_embedding=text,
                              uncond=torch.randn(1, 77, config.context_dim, generator=g),
                              keys=(EmotionKey(0.0, "bench"),), fps=float(FPS))
    return SamplerInputs(
        reference=torch.rand(3, size, size, generator=g) * 2 - 1,
        face_region=torch.rand(3, size, size, generator=g),
        identity=torch.randn(config.face_projection.identity_dim, generator=g),
        masks=[[torch.rand(s * s, generator=g) for s in levels] for _ in range(3)],
        audio=AudioFeatures(torch.randn(padded, ap.layers, ap.channels, generator=g), num_frames=frames,
                            clip_length=clip_length),
        num_frames=frames, emotion=emotion)


def run_bench(full: bool = False, size: int | None = None, steps: int = 4, clips: int = 2,
              clip_length: int = SamplingSettings.clip_length,
              device: str | None = None, dtype: str | torch.dtype | None = None) -> BenchResult:
    device_ = resolve_device(device)
    dtype_ = resolve_dtype(dtype, device_)
    config = NetConfig.full() if full else NetConfig.tiny()
    size = size or (512 if full else 128)
    net = build_net(config, device=device_, dtype=dtype_, zero_init=False).requires_grad_(False)
    vae = _vae(full, size).to(device_, dtype_).requires_grad_(False)
    frames = clips * clip_length
    cond = _conditioning(config, size, frames, clip_length)
    settings = SamplingSettings(steps=steps, clip_length=clip_length)
    counts = {"denoising": 0, "reference": 0}
    net.denoising_unet.register_forward_hook(lambda *_: counts.__setitem__("denoising", counts["denoising"] + 1))
    net.reference_unet.register_forward_hook(lambda *_: counts.__setitem__("reference", counts["reference"] + 1))
    if device_.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    out = generate_frames(net, vae, make_scheduler(), cond, settings, device=device_, dtype=dtype_)
    if device_.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak_cuda = torch.cuda.max_memory_allocated() / 2**20 if device_.type == "cuda" else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return BenchResult(out.shape[0], seconds, counts["denoising"], counts["reference"], rss, peak_cuda)


def bench_args() -> tuple[Arg, ...]:
    s = SamplingSettings
    return (
        arg("--full", action="store_true", help="the released model sizes (random weights)"),
        arg("--size", type=int, help="image size in pixels (default 512 full, 128 tiny)"),
        arg("--steps", type=int, default=4, help=f"denoising steps per clip (release: {s.steps})"),
        arg("--clips", type=int, default=2, help="number of clips to generate"),
        arg("--clip-length", type=int, default=s.clip_length, help=f"frames per clip (release: {s.clip_length})"),
        arg("--device", default="auto", help="auto, cpu, cuda, cuda:1, ..."),
        arg("--dtype", default="auto", choices=PRECISIONS),
    )


def run_bench_command(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    name = "full" if args.full else "tiny"
    print(f"EmoCAST sampler benchmark: {name} model, {args.size or (512 if args.full else 128)} px, "
          f"{args.steps} steps, {args.clips} clips of {args.clip_length} frames, {dtype} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    result = run_bench(args.full, args.size, args.steps, args.clips, args.clip_length, args.device, dtype)
    print(result.report())
    release_steps = SamplingSettings.steps
    if args.steps != release_steps:
        per_step = result.seconds / result.frames / args.steps
        print(f"~ at {release_steps} steps (linear in steps): {per_step * release_steps:.3f} s per frame")
    return 0
