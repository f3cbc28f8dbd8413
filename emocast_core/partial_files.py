"""Files that appear only when complete: each write goes to a hidden partial file beside its destination that
is renamed over it at the end.

A partial file is `.<name>.<pid>.partial` (`.<name>.<pid>-<n>.partial` for a second writer of the same file in
one process), created with a plain exclusive open so the finished file gets the permissions of the user's
umask (mkstemp would make it 0600). A failure, Ctrl-C or the command line's SIGTERM deletes it; one left by a
SIGKILL or a power loss is deleted by the next write to the same destination, once the process named in it no
longer runs. A symbolic link at the destination is written through: its target is replaced, the link stays.
Used by the video writer and the weights-file writer; imports nothing of the library.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_PARTIAL_OWNER = re.compile(r"(\d+)(?:-\d+)?")
# The partial files this process is writing now, as (device, inode): a path can be spelt many ways, and a file
# named with our own PID that is not among them was left by an earlier process with the same PID (in a
# container every run can be PID 1). Process-wide by nature: it is what "this process is writing" means.
_ACTIVE_PARTIALS: dict[Path, tuple[int, int]] = {}
_ACTIVE_LOCK = threading.Lock()


def write_target(path: Path) -> Path:
    """The file a write to `path` replaces: `path`, or the target of the symbolic link at `path`."""
    if not path.is_symlink():
        return path
    try:
        target = path.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop before Python 3.13
        raise OSError(f"cannot write {path}: it is a symbolic link that cannot be followed ({exc})") from exc
    logger.info("%s is a symbolic link: writing to its target %s", path, target)
    return target


def _file_id(path: str | os.PathLike) -> tuple[int, int]:
    info = os.stat(path, follow_symlinks=False)
    return info.st_dev, info.st_ino


def _process_exists(pid: int) -> bool:
    """Whether a process `pid` runs on this machine; True when that cannot be told (never delete by guess)."""
    if pid <= 0:
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process on Windows
        return _windows_process_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists but belongs to another user
        return True
    return True


def _windows_process_exists(pid: int) -> bool:
    try:
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        kernel32.OpenProcess.restype = ctypes.c_void_p
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = ctypes.c_ulong()
            if not kernel32.GetExitCodeProcess(ctypes.c_void_p(handle), ctypes.byref(code)):
                return True
            return code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(ctypes.c_void_p(handle))
    except Exception:  # noqa: BLE001 - unknown: keep the file
        return True


def remove_stale_partials(target: Path, what: str = "file") -> None:
    """Delete `target`'s partial files whose writing process no longer runs (left by a SIGKILL or a crash).

    A file named with this process's own PID that this process is not writing is stale too: it was left by an
    earlier process with the same PID (in a container every run can be PID 1)."""
    prefix = f".{target.name}."
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if not (name.startswith(prefix) and name.endswith(PARTIAL_SUFFIX)):
            continue
        owner = _PARTIAL_OWNER.fullmatch(name[len(prefix): -len(PARTIAL_SUFFIX)])
        if owner is None or not entry.is_file(follow_symlinks=False):
            continue
        partial, pid = Path(entry.path), int(owner.group(1))
        with _ACTIVE_LOCK:
            try:
                if _file_id(partial) in _ACTIVE_PARTIALS.values() or (pid != os.getpid() and _process_exists(pid)):
                    continue
                size = os.stat(partial, follow_symlinks=False).st_size
                partial.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                logger.warning("could not remove the stale partial file %s: %s", partial, exc)
                continue
        logger.info("removed %s (%.1f MB), a partial %s left by process %d, which no longer runs",
                    partial, size / 2**20, what, pid)


def create_partial(target: Path) -> Path:
    """Create (exclusively) and register this process's partial file for `target`; plain open, not mkstemp
    (always 0600), so the finished file gets the permissions of the user's umask."""
    pid = os.getpid()
    with _ACTIVE_LOCK:
        for n in range(100):
            partial = target.with_name(f".{target.name}.{pid}{f'-{n}' if n else ''}{PARTIAL_SUFFIX}")
            try:
                partial.open("xb").close()
            except FileExistsError:  # this process writes it already, or another one with the same PID
                continue
            _ACTIVE_PARTIALS[partial] = _file_id(partial)
            return partial
    raise FileExistsError(f"cannot write {target}: its partial files .{target.name}.{pid}-<n>{PARTIAL_SUFFIX} "
                          "are all in use")


def release_partial(partial: Path, delete: bool) -> None:
    with _ACTIVE_LOCK:
        _ACTIVE_PARTIALS.pop(partial, None)
        if delete:
            partial.unlink(missing_ok=True)
