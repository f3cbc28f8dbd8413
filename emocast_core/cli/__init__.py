"""The command line, ``python -m emocast_core <command> ...``: one table of commands (`COMMANDS`), each a
module of this package that parses its options, calls the library and prints."""
from __future__ import annotations

from collections.abc import Sequence

from .bench import bench_args, run_bench_command
from .checkpoint_tools import convert_args, inspect_args, run_convert, run_inspect
from .generate import generate_args, run_generate
from .selftest import run_selftest, selftest_args
from .table import Command, build_parser, run_cli

COMMANDS: tuple[Command, ...] = (
    Command("generate", "portrait + speech + emotion text -> talking-head MP4", run_generate, generate_args),
    Command("selftest", "tiny models in the real formats, a real photo, synthesised speech -> MP4 (no GPU, no "
            "downloads): checks that an install works", run_selftest, selftest_args),
    Command("convert", "net.pth -> single-file safetensors (with the model config as metadata)", run_convert,
            convert_args),
    Command("inspect", "summarise a weights file and check its layout (exit 1 if it does not match)",
            run_inspect, inspect_args),
    Command("bench", "seconds per frame, network calls and peak memory of the sampler (random weights)",
            run_bench_command, bench_args),
)

__all__ = ["COMMANDS", "main", "run_cli"]


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(COMMANDS, "python -m emocast_core", "EmoCAST: emotional talking-head videos "
                                "from a portrait, speech and emotion text"), argv)
