"""Helpers of the tests that check what is left in a folder: its listing, a umask, a PID that no longer runs."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path


def listing(folder: Path) -> list[str]:
    """The names in `folder`, sorted (hidden partial files included)."""
    return sorted(p.name for p in folder.iterdir())


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid
