"""What every command line of the project shares: logging set-up and turning errors into messages."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence


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
