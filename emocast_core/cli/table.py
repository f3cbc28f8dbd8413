"""What every command line of the project shares: a command table turned into argparse, logging set-up,
and errors turned into messages.

A command is one function ``(args) -> exit code`` plus one :class:`Command` in a table; its work lives in the
library, the function only parses options and prints. `python -m emocast_core` and `python -m training` are
each one table.

While a command runs, SIGTERM (``docker stop``, systemd, ``kill``) is handled like Ctrl-C: it raises
:class:`Terminated` (a KeyboardInterrupt) in the main thread, so every ``finally`` / ``__exit__`` clean-up runs
(the writers delete their partial files), and the command line exits with 143 (128 + SIGTERM).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a Ctrl-C
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived while a command ran. A KeyboardInterrupt, so that code which cleans up after a Ctrl-C
    cleans up after a SIGTERM the same way."""


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


@contextmanager
def sigterm_raises_terminated() -> Iterator[None]:
    """For the duration of the block, a SIGTERM raises :class:`Terminated` in the main thread; the previous
    handler is restored afterwards. Only the first SIGTERM raises (a second one must not interrupt the clean-up
    the first started). Nothing is installed outside the main thread (Python allows handlers only there) or
    when SIGTERM is ignored (whoever started the process that way wants it to survive one)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_IGN:
        yield
        return
    state = {"armed": True}

    def on_sigterm(signum: int, frame: object) -> None:
        if state["armed"]:
            state["armed"] = False
            raise Terminated(f"received signal {signum} (SIGTERM)")

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        state["armed"] = False  # a SIGTERM from here on must not turn a finished command into a failed one
        # None: the previous handler was not installed from Python; the default is the closest we can restore.
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse, run `args.run(args)` and map bad input (ValueError / OSError, whose messages say what is wrong
    and what to do) to exit code 1, a Ctrl-C to 130 and a SIGTERM to 143, without a traceback."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    try:
        with sigterm_raises_terminated():
            return args.run(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Terminated:
        print("terminated (SIGTERM): no output was written", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
