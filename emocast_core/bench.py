"""``python -m emocast_core.bench ...``: the `bench` command of `python -m emocast_core` (see `cli/bench.py`)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
