"""`python -m emocast_core convert` and `inspect`: the weights-file tools."""
from __future__ import annotations

import argparse
from pathlib import Path

from .table import Arg, arg


def config_args() -> tuple[Arg, ...]:
    return (
        arg("--config", type=Path, metavar="CONFIG.json",
            help="model config the weights belong to (default: the one stored in the file, else full size)"),
        arg("--tiny", action="store_true", help="use the built-in tiny test config"),
    )


def model_config(args: argparse.Namespace):
    """The NetConfig chosen by --config / --tiny, or None (let the file decide)."""
    from ..config import NetConfig

    if args.config is not None and args.tiny:
        raise ValueError("give either --config or --tiny, not both")
    if args.tiny:
        return NetConfig.tiny()
    return NetConfig.from_json(args.config) if args.config is not None else None


def convert_args() -> tuple[Arg, ...]:
    return (arg("src", type=Path), arg("dst", type=Path),
            arg("--dtype", choices=("fp16", "bf16", "fp32"), help="cast floating tensors (default: keep)"),
            *config_args())


def run_convert(args: argparse.Namespace) -> int:
    from ..checkpoints import convert

    out = convert(args.src, args.dst, dtype=args.dtype, config=model_config(args))
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MB)")
    return 0


def inspect_args() -> tuple[Arg, ...]:
    return (arg("file", type=Path), *config_args())


def run_inspect(args: argparse.Namespace) -> int:
    from .. import checkpoints as ck

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
