"""Reading and writing weights files: safetensors (``.safetensors``, ``.sft``) and torch pickles (``.pth``,
``.pt``, ``.ckpt``, ``.bin``, always with ``weights_only``), with one error type for every unusable file.

Layouts are read without tensor data: a safetensors header, or a torch zip opened on the ``meta`` device, so
a wrong 5 GB file is rejected in well under a second.

Files are written atomically, through a hidden ``.<name>.<pid>.partial`` beside the destination that is renamed
over it once complete (with the permissions of the user's umask, like any new file). A failure, Ctrl-C or
the command line's SIGTERM deletes it; one left by a SIGKILL is deleted by the next write to the same
destination once the process named in it no longer runs. A symbolic link at the destination is written
through: its target is replaced, the link stays.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import struct
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from ..partial_files import create_partial, release_partial, remove_stale_partials, write_target
from .layout import Layout, TensorSpec, format_report

if TYPE_CHECKING:
    from .layout import LayoutReport

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
WEIGHT_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
# Wrappers that training scripts put around a state dict (Lightning / DeepSpeed style).
_WRAPPER_KEYS = ("state_dict", "module")
_DDP_PREFIX = "module."
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_SAFETENSORS_CODES = {torch_name: code for code, torch_name in _SAFETENSORS_DTYPES.items()}
# The reference writer orders tensors by dtype (its enum order, descending), then name: larger items first, so
# every tensor's data is aligned to its item size. Following it makes our files byte-identical to its.
_SAFETENSORS_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                      "F64", "I64", "U64")
_DTYPE_ALIASES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors reference reader refuses larger headers too


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: str | Path, problem: str, report: "LayoutReport | None" = None):
        self.path = Path(path)
        self.report = report
        message = f"{self.path}: {problem}"
        if report is not None and not report.ok:
            message += "\n" + format_report(report)
        super().__init__(message)


def read_layout(path: str | Path) -> Layout:
    """Names, shapes and dtypes of the tensors in a weights file, without reading tensor data.

    ``.safetensors``: only the header is parsed. ``.pth/.pt/.ckpt/.bin``: the pickle is opened on the
    ``meta`` device (weights_only). A ``state_dict``/``module`` wrapper or a DDP ``module.`` key prefix
    is removed (and logged), as in :func:`load_state_dict`.
    """
    path = existing_file(path)
    if is_safetensors(path):
        return read_safetensors_header(path)[0]
    tensors = _torch_load(path, "meta")
    return {name: TensorSpec(tuple(t.shape), dtype_name(t.dtype)) for name, t in tensors.items()}


def read_safetensors_header(path: str | Path) -> tuple[Layout, dict[str, str]]:
    """(layout, ``__metadata__``) of a safetensors file from its header; rejects truncated files."""
    path = existing_file(path)
    file_size = path.stat().st_size
    try:
        with path.open("rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(path, f"is not a safetensors file (only {file_size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(_MAX_HEADER_BYTES, file_size - 8):
                raise CheckpointError(path, f"is not a valid safetensors file (header length {header_len} "
                                            f"does not fit in a file of {file_size} bytes; truncated?)")
            header = json.loads(fh.read(header_len))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"is not a valid safetensors file (unreadable header: {exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, "is not a valid safetensors file (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_len = file_size - 8 - header_len
    layout: Layout = {}
    for name, entry in header.items():
        layout[name] = _parse_header_entry(path, name, entry, data_len)
    return layout, dict(metadata)


def read_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; ``{}`` for pickle files (they have none)."""
    path = existing_file(path)
    return read_safetensors_header(path)[1] if is_safetensors(path) else {}


def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a weights file (``weights_only`` for pickles); corrupt files raise CheckpointError."""
    path = existing_file(path)
    if not is_safetensors(path):
        return _torch_load(path, device)
    read_safetensors_header(path)  # clear error for truncated files before the reader's own
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(path, f"cannot be read as safetensors: {exc}") from exc


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                     dtype: torch.dtype | str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write one safetensors file (floating tensors cast to `dtype` when given), atomically: the data goes
    to `.<name>.<pid>.partial` in the destination's folder, renamed over it only once complete. Returns
    `path` as given (a symbolic link there is written through to its target)."""
    path = Path(path)
    target_dtype = parse_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = cast_floating(tensor.detach(), target_dtype).to("cpu").contiguous()
        tensors[name] = _own_storage(tensor, seen_storages)
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    target = write_target(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(target)
    tmp = create_partial(target)
    renamed = False
    try:
        if target.exists():
            # info, not a warning: replacing the destination is what was asked for, but it should not go unsaid.
            logger.info("%s exists; it will be replaced when the new file is complete", path)
        with tmp.open("r+b") as fh:
            _write_safetensors(fh, tensors, meta)
            fh.flush()
            os.fsync(fh.fileno())  # else a crash right after the rename can leave a truncated file under `path`
        os.replace(tmp, target)
        renamed = True
    finally:
        release_partial(tmp, delete=not renamed)  # once renamed, its name may already be another writer's
    return path


def _write_safetensors(fh: Any, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """The safetensors format, streamed tensor by tensor into our own file. (`safetensors.torch.save_file`
    writes to a randomly named temporary file of its own, mode 0600, which a SIGKILL would leave behind.)"""
    if sys.byteorder != "little":
        raise OSError("writing safetensors files needs a little-endian machine")
    try:
        codes = {name: _SAFETENSORS_CODES[dtype_name(t.dtype)] for name, t in tensors.items()}
    except KeyError as exc:
        raise ValueError(f"safetensors cannot store tensors of dtype {exc.args[0]}") from None
    order = sorted(tensors, key=lambda name: (-_SAFETENSORS_ORDER.index(codes[name]), name))
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": codes[name], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    fh.write(struct.pack("<Q", len(blob)))
    fh.write(blob)
    for name in order:
        fh.write(memoryview(tensors[name].reshape(-1).view(torch.uint8).numpy()))


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32") from None


def existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    return path


def is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _torch_load(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(path, "is not a weights file (unknown extension); expected one of "
                                    + ", ".join(WEIGHT_SUFFIXES))
    try:
        # mmap only works for the zip format (torch >= 1.6); legacy pickles are read whole.
        obj = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        what = f" (it holds a {found.group(1)})" if found else ""
        # Not torch's advice to retry with weights_only=False: that runs whatever code the file carries.
        raise CheckpointError(path, f"holds Python objects other than tensors and plain containers{what}; "
                                    "refusing to unpickle it, since that could run code. Use a weights-only file: "
                                    "convert it to safetensors on a machine where you trust its source") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, struct.error) as exc:
        raise CheckpointError(path, f"cannot be read (truncated or corrupt?): {exc}") from exc
    return _unwrap_state_dict(path, obj)


def _unwrap_state_dict(path: Path, obj: Any) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                logger.info("%s: tensors are wrapped in a %r entry; reading that", path, key)
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"does not hold a state dict (found {type(obj).__name__})")
    not_tensors = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise CheckpointError(path, "is not a plain state dict; entries that are not tensors: "
                                    + ", ".join(not_tensors[:8]))
    if obj and all(str(k).startswith(_DDP_PREFIX) for k in obj):
        logger.info("%s: removing the %r prefix of every key", path, _DDP_PREFIX)
        return {k[len(_DDP_PREFIX):]: v for k, v in obj.items()}
    return dict(obj)


def _parse_header_entry(path: Path, name: str, entry: Any, data_len: int) -> TensorSpec:
    try:
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = tuple(int(s) for s in entry["shape"])
        begin, end = (int(o) for o in entry["data_offsets"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(path, f"has a malformed safetensors header entry for {name!r}: {entry!r}") from exc
    if end > data_len:
        raise CheckpointError(path, f"is truncated: tensor {name!r} ends at byte {end} of the data section, "
                                    f"which holds only {data_len} bytes")
    if end - begin != math.prod(shape) * itemsize(dtype):
        raise CheckpointError(path, f"is corrupt: tensor {name!r} {list(shape)} {dtype} has "
                                    f"{end - begin} bytes of data")
    return TensorSpec(shape, dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(dtype_name: str) -> int:
    return getattr(torch, dtype_name).itemsize


def cast_floating(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    return tensor.to(dtype)


def _own_storage(tensor: torch.Tensor, seen: set[int]) -> torch.Tensor:
    """safetensors refuses tensors that share or only partly cover a storage: give those their own."""
    storage = tensor.untyped_storage()
    partial = tensor.storage_offset() != 0 or storage.nbytes() != tensor.numel() * tensor.element_size()
    if partial or storage.data_ptr() in seen:
        tensor = tensor.clone()
    seen.add(tensor.untyped_storage().data_ptr())
    return tensor
