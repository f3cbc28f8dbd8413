"""Noise scheduler and initial noise of the EmoCAST sampler (docs/model.md §5.6–5.7, docs/release_quirks.md §6–7).

The official inference builds a diffusers ``DDIMScheduler`` from ``configs/inference/default.yaml`` plus the
zero-SNR switches; training uses the same settings with ``"scaled_linear"`` betas (docs/model.md §6.2). We use diffusers'
scheduler as is and only fix its configuration here.
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from types import MappingProxyType
from typing import Any

import torch
from diffusers import DDIMScheduler

# Read-only: callers change settings through ``make_scheduler(**overrides)``, never by mutating this.
OFFICIAL_INFERENCE_SETTINGS: MappingProxyType = MappingProxyType({
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "linear",  # inference uses "linear"; the training script overrides it (docs/release_quirks.md §7)
    "clip_sample": False,
    "set_alpha_to_one": True,  # the last step returns x0 (final alpha_cumprod 1.0)
    "steps_offset": 1,  # ignored by "trailing" spacing, kept because the official config sets it
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
})

# The legacy half-precision sampler below draws uniforms with 11 random bits (fp16 mantissa + 1).
_HALF_UNIFORM_BITS = 11
_BLOCK = 16  # the legacy kernel transforms uniforms in blocks of 16 (8 radii x 8 angles)


def _ddim_parameter_names() -> frozenset[str]:
    params = inspect.signature(DDIMScheduler.__init__).parameters
    return frozenset(name for name in params if name != "self")


def make_scheduler(**overrides: Any) -> DDIMScheduler:
    """The official inference DDIM scheduler (linear betas + zero-SNR, v-prediction, trailing spacing).

    ``overrides`` replace individual settings (any ``DDIMScheduler`` constructor argument).
    Call ``set_timesteps(40)`` for the official 40 steps 999, 974, ..., 24.
    """
    unknown = sorted(set(overrides) - _ddim_parameter_names())
    if unknown:
        raise ValueError(f"unknown DDIMScheduler setting(s) {unknown}; valid names are "
                         f"{sorted(_ddim_parameter_names())}")
    return DDIMScheduler(**{**OFFICIAL_INFERENCE_SETTINGS, **overrides})


def make_training_scheduler(**overrides: Any) -> DDIMScheduler:
    """The training noise scheduler: the inference settings with ``"scaled_linear"`` betas (docs/model.md §6.2).

    The official training script copies the inference kwargs and only switches the beta schedule, so
    zero-SNR rescaling and the v-prediction target stay on.
    """
    return make_scheduler(**{"beta_schedule": "scaled_linear", **overrides})


def initial_noise(generator: torch.Generator, shape: Sequence[int], dtype: torch.dtype,
                  *, draw_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Initial latents drawn the official way: ``randn(shape)`` on a CPU generator, in ``draw_dtype``.

    The official pipeline calls diffusers' ``randn_tensor(shape, generator=<CPU generator>, dtype=<run
    dtype>)``: the numbers are drawn on the CPU in the run's own precision and only then moved to the
    device. ``draw_dtype`` defaults to ``dtype`` for that reason (the fp16 release config draws fp16 noise;
    the fp32 parity fixture draws fp32 noise). Pass ``draw_dtype=torch.float16`` to get the official fp16
    noise in an fp32 run. Drawing fp32 and casting gives completely different numbers, and a CUDA
    generator gives a different stream, so both are ruled out. The result is on the CPU, in ``dtype``;
    the caller moves it to its device. ``init_noise_sigma`` is 1.0, so no scaling is applied.

    Consecutive calls on the same generator continue the stream exactly like consecutive official clips.
    """
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"initial_noise needs a torch.Generator, got {type(generator).__name__}")
    if generator.device.type != "cpu":
        raise ValueError(f"initial_noise needs a CPU generator (the official noise is drawn on the CPU), "
                         f"got one on {generator.device}; create it with torch.Generator('cpu')")
    shape = tuple(int(s) for s in shape)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"noise shape must be non-empty with positive sizes, got {shape}")
    draw_dtype = dtype if draw_dtype is None else draw_dtype
    if draw_dtype == torch.float16:
        noise = _legacy_half_normal(generator, math.prod(shape)).view(shape)
    else:
        noise = torch.randn(shape, generator=generator, dtype=draw_dtype)
    return noise.to(dtype)


def _legacy_half_normal(generator: torch.Generator, numel: int) -> torch.Tensor:
    """``torch.randn(numel, dtype=float16)`` on the CPU as torch <= 2.2 computed it (the release's torch).

    Why this exists: newer torch releases (2.14 at least) draw CPU fp16 normals through the fp32 path, so
    the same seed gives different noise than the official run (first value 1.927 instead of 0.387 for
    seed 42, shape (1, 4, 16, 64, 64)). The
    older kernel, which we reproduce on any torch version, did: one 32-bit draw per element whose low 11
    bits give a uniform u = k/2048 stored as fp16; then per block of 16, Box-Muller with the first 8
    values as radii and the last 8 as angles, every intermediate rounded to fp16:
    ``r = h(sqrt(h(-2 h(log(h(1-u1))))))``, ``theta = h(2 pi u2)``, ``z = h(r h(cos theta))`` and
    ``h(r h(sin theta))``. A length that is not a multiple of 16 recomputes the last 16 values from 16
    fresh draws. Because u takes only 2048 values, the transcendental parts are exact look-up tables.
    """
    if numel < _BLOCK:
        raise ValueError(f"the official fp16 noise needs at least {_BLOCK} values per draw, got {numel}; "
                         "latent noise is always larger than that")
    levels = 1 << _HALF_UNIFORM_BITS
    # randint(0, 2**11) consumes exactly one 32-bit draw per element and keeps its low 11 bits,
    # which is what the legacy uniform sampler used.
    codes = torch.randint(0, levels, (numel,), generator=generator, dtype=torch.int64)
    radius, cosine, sine = _legacy_half_tables(levels)

    out = torch.empty(numel, dtype=torch.float16)
    full = numel - numel % _BLOCK
    out[:full] = _box_muller_blocks(codes[:full], radius, cosine, sine)
    if full != numel:
        tail = torch.randint(0, levels, (_BLOCK,), generator=generator, dtype=torch.int64)
        out[numel - _BLOCK:] = _box_muller_blocks(tail, radius, cosine, sine)
    return out


def _legacy_half_tables(levels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Radius and cos/sin values for every possible fp16 uniform, rounded as the legacy kernel rounds."""
    u = torch.arange(levels, dtype=torch.float64) / levels  # exact in fp16
    u1 = (1.0 - u).to(torch.float16)  # (0, 1] so that log() is finite
    log_u1 = torch.log(u1.float()).half()
    radius = torch.sqrt(-2.0 * log_u1.float()).half()
    # The angle is computed in double and narrowed through float to half, as the C++ conversion did.
    theta = (2.0 * math.pi * u).float().half()
    return radius.float(), torch.cos(theta.float()).half().float(), torch.sin(theta.float()).half().float()


def _box_muller_blocks(codes: torch.Tensor, radius: torch.Tensor, cosine: torch.Tensor,
                       sine: torch.Tensor) -> torch.Tensor:
    blocks = codes.view(-1, 2, _BLOCK // 2)
    r = radius[blocks[:, 0]]
    angle = blocks[:, 1]
    # fp16 x fp16 products are exact in fp32, so one rounding to fp16 matches the legacy arithmetic;
    # "+ 0" reproduces the kernel's "+ mean" (it turns a -0 into +0).
    values = torch.stack((r * cosine[angle], r * sine[angle]), dim=1).half() + 0.0
    return values.reshape(-1)
