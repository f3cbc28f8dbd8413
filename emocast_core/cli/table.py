"""What every command line of the project shares: a command table turned into argparse, logging set-up,
and errors turned into messages.

A command is one function ``(args) -> exit code`` plus one :class:`Command` in a table; its work lives in the
library, the function only parses options and prints. `python -m emocast_core` and `python -m training` are
each one table.
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


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
    # A function, so that defaults read from the library's dataclasses are read when the parser is built.
    args: Callable[[], Sequence[Arg]] = tuple


def build_parser(commands: Sequence[Command], prog: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-q", "--quiet", action="store_true", help="only print warnings and results")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        for a in command.args():
            p.add_argument(*a.flags, **a.options)
        p.set_defaults(run=command.run)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run `args.run(args)` and map bad input (ValueError / OSError, whose messages say what is wrong
    and what to do) to exit code 1 and a Ctrl-C to 130, without a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
