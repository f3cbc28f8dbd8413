"""Command line: ``python -m emocast_core <command> ...``.

A command is one function ``(args) -> exit code`` plus one :class:`Command` line in :data:`COMMANDS`;
its work lives in the library, the function only parses options and prints.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from .cli import run_cli


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call."""

    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    args: tuple[Arg, ...] = ()


CONFIG_ARGS = (
    arg("--config", type=Path, metavar="CONFIG.json",
        help="model config the weights belong to (default: the one stored in the file, else full size)"),
    arg("--tiny", action="store_true", help="use the built-in tiny test config"),
)


def model_config(args: argparse.Namespace):
    """The NetConfig chosen by --config / --tiny, or None (let the file decide)."""
    from .config import NetConfig

    if args.config is not None and args.tiny:
        raise ValueError("give either --config or --tiny, not both")
    if args.tiny:
        return NetConfig.tiny()
    return NetConfig.from_json(args.config) if args.config is not None else None


# ---- commands ------------------------------------------------------------------------------------

def run_convert(args: argparse.Namespace) -> int:
    from .checkpoints import convert

    out = convert(args.src, args.dst, dtype=args.dtype, config=model_config(args))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from . import checkpoints as ck

    layout = ck.read_layout(args.file)
    config = ck.resolve_config(args.file, model_config(args))
    print(f"{args.file}: {len(layout)} tensors")
    print(ck.format_summary(ck.summarize_layout(layout)))
    try:
        ck.check_layout(args.file, layout, config)
    except ck.CheckpointError as exc:
        print(f"layout does NOT match:\n{exc}")
        return 1
    print(f"layout matches the {ck.describe_config(config)}")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from .commands import generate_from_files
    from .sampling import SamplingSettings

    settings = SamplingSettings(steps=args.steps, cfg=args.cfg, seed=args.seed, clip_length=args.clip_length,
                                weights=(args.pose_weight, args.face_weight, args.lip_weight))
    out = generate_from_files(args.models, args.image, args.audio, args.emotion, args.out, settings,
                              size=args.size, crop=not args.no_crop, crossfade=args.crossfade,
                              strength=args.strength, device=args.device, dtype=args.dtype, net=args.net,
                              separate_vocals=not args.no_separation,
                              show_progress=not args.quiet)
    print(f"wrote {out}")
    return 0


def run_selftest(args: argparse.Namespace) -> int:
    from .commands import selftest

    print(selftest(args.out, steps=args.steps, show_progress=not args.quiet))
    return 0


GENERATE_ARGS = (
    arg("--models", type=Path, required=True, metavar="DIR",
        help="model folder: emocast.safetensors (or net.pth), vae/, clip/, wav2vec2/, face_analysis/"),
    arg("--image", type=Path, required=True, help="portrait (PNG / JPEG, any size; the largest face is used)"),
    arg("--audio", type=Path, required=True, help="speech (WAV / MP3 / FLAC / M4A / OGG, any rate or channels)"),
    arg("--emotion", default="a person talking",
        help="emotion text, e.g. 'a person talking happily', or a timeline "
             "'0: calm and friendly | 4.0: suddenly furious | 9.5: sad' (seconds)"),
    arg("--out", type=Path, required=True, help="output video (.mp4, H.264 + the input speech as AAC)"),
    arg("--steps", type=int, default=40, help="DDIM steps per clip (default 40, as released)"),
    arg("--cfg", type=float, default=3.5, help="classifier-free guidance scale, above 1 (default 3.5)"),
    arg("--seed", type=int, default=42, help="random seed (default 42, as released)"),
    arg("--size", type=int, default=512, help="output size in pixels, a multiple of 64 (default 512)"),
    arg("--clip-length", type=int, default=16, help="frames generated together (default 16, as released)"),
    arg("--pose-weight", type=float, default=1.0, help="weight of the pose (whole-frame) audio branch"),
    arg("--face-weight", type=float, default=1.0, help="weight of the expression (face) audio branch"),
    arg("--lip-weight", type=float, default=1.0, help="weight of the lip audio branch"),
    arg("--crossfade", type=float, default=0.5, help="seconds to blend between timeline emotions"),
    arg("--strength", type=float, default=1.0,
        help="EXPERIMENTAL emotion strength: 0 = neutral text, 1 = as released, >1 exaggerates"),
    arg("--no-crop", action="store_true",
        help="resize the whole image instead of cropping a square around the face (the release's behaviour)"),
    arg("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ..."),
    arg("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
        help="precision (auto: fp16 on a GPU, fp32 on the CPU)"),
    arg("--net", type=Path, help="weights file to use instead of the one in --models"),
    arg("--no-separation", action="store_true",
        help="skip vocal separation even when the model folder has separator/Kim_Vocal_2.onnx"),
)

COMMANDS: tuple[Command, ...] = (
    Command("generate", "portrait + speech + emotion text -> talking-head MP4", run_generate, GENERATE_ARGS),
    Command("selftest", "tiny models in the real formats, a real photo, synthesised speech -> MP4 (no GPU, no "
            "downloads): checks that an install works", run_selftest,
            (arg("--out", type=Path, default=Path("selftest_out"), help="folder for selftest.mp4"),
             arg("--steps", type=int, default=2, help="denoising steps per clip"))),
    Command("convert", "net.pth -> single-file safetensors (with the model config as metadata)", run_convert,
            (arg("src", type=Path), arg("dst", type=Path),
             arg("--dtype", choices=("fp16", "bf16", "fp32"), help="cast floating tensors (default: keep)"),
             *CONFIG_ARGS)),
    Command("inspect", "summarise a weights file and check its layout (exit 1 if it does not match)",
            run_inspect, (arg("file", type=Path), *CONFIG_ARGS)),
)


# ---- entry point ---------------------------------------------------------------------------------

def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m emocast_core", description=__doc__.splitlines()[0])
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        for a in command.args:
            p.add_argument(*a.flags, **a.options)
        p.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
