"""Reading, checking, converting and initialising EmoCAST weights.

The released weights are one ``net.pth``: the strict ``state_dict()`` of a container with five children
(``reference_unet``, ``denoising_unet``, ``face_locator``, ``imageproj``, ``audioproj``). We also write and
read a single-file safetensors form of the same dictionary (plus the model config as metadata).

Layout checks run before any tensor data is read: a safetensors header or a torch zip opened on the
``meta`` device is enough, so a wrong 5 GB file is rejected in well under a second with a report that
groups the offending keys by pattern instead of listing thousands of names.
"""
from __future__ import annotations

import inspect as pyinspect
import json
import logging
import math
import os
import pickle
import struct
import tempfile
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, NamedTuple, Sequence

import torch

from .config import NetConfig

if TYPE_CHECKING:
    from .models.net import EmoCASTNet

logger = logging.getLogger(__name__)

TOP_LEVEL_MODULES = ("reference_unet", "denoising_unet", "face_locator", "imageproj", "audioproj")
SAFETENSORS_SUFFIXES = (".safetensors",)
PICKLE_SUFFIXES = (".pth", ".pt", ".ckpt", ".bin")
# Wrappers that training scripts put around a state dict (Lightning / DeepSpeed style).
_WRAPPER_KEYS = ("state_dict", "module")
_DDP_PREFIX = "module."
# Parts of the SD1.5 UNet that the reference UNet does not have (its output is never decoded).
_REFERENCE_UNET_DROPS = ("conv_norm_out.", "conv_out.")
_SD_WEIGHT_NAMES = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.bin",
)
# UNet2DConditionModel arguments that change parameter names or shapes (the rest only change behaviour).
_UNET_SHAPE_FIELDS = (
    "in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
    "down_block_types", "up_block_types", "mid_block_type", "use_linear_projection",
    "transformer_layers_per_block", "conv_in_kernel", "conv_out_kernel", "time_embedding_type",
    "time_embedding_dim", "time_cond_proj_dim", "class_embed_type", "num_class_embeds",
    "projection_class_embeddings_input_dim", "addition_embed_type", "encoder_hid_dim",
    "encoder_hid_dim_type", "only_cross_attention", "dual_cross_attention",
)
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}
_DTYPE_ALIASES = {
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors reference reader refuses larger headers too


class TensorSpec(NamedTuple):
    """What a file declares about one tensor, without its data."""

    shape: tuple[int, ...]
    dtype: str  # torch name: "float16", "bfloat16", "float32", ...


Layout = dict[str, TensorSpec]


class CheckpointError(ValueError):
    """A weights file that cannot be used; the message names the file and what is wrong with it."""

    def __init__(self, path: str | Path, problem: str, report: "LayoutReport | None" = None):
        self.path = Path(path)
        self.report = report
        message = f"{self.path}: {problem}"
        if report is not None and not report.ok:
            message += "\n" + format_report(report)
        super().__init__(message)


# ---- layouts -------------------------------------------------------------------------------------

def read_layout(path: str | Path) -> Layout:
    """Names, shapes and dtypes of the tensors in a weights file, without reading tensor data.

    ``.safetensors``: only the header is parsed. ``.pth/.pt/.ckpt/.bin``: the pickle is opened on the
    ``meta`` device (weights_only). A ``state_dict``/``module`` wrapper or a DDP ``module.`` key prefix
    is removed (and logged), as in :func:`load_state_dict`.
    """
    path = _existing_file(path)
    if _is_safetensors(path):
        return read_safetensors_header(path)[0]
    tensors = _torch_load(path, "meta")
    return {name: TensorSpec(tuple(t.shape), _dtype_name(t.dtype)) for name, t in tensors.items()}


def read_safetensors_header(path: str | Path) -> tuple[Layout, dict[str, str]]:
    """(layout, ``__metadata__``) of a safetensors file from its header; rejects truncated files."""
    path = _existing_file(path)
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
    path = _existing_file(path)
    return read_safetensors_header(path)[1] if _is_safetensors(path) else {}


def expected_layout(config: NetConfig) -> dict[str, tuple[int, ...]]:
    """The exact ``state_dict`` layout (parameters + persistent buffers) of the networks for `config`."""
    from .models.net import build_net

    net = build_net(config, device="meta")
    return {name: tuple(t.shape) for name, t in net.state_dict().items()}


def stock_unet_layout(config: NetConfig) -> dict[str, tuple[int, ...]]:
    """Layout of a plain diffusers ``UNet2DConditionModel`` built from ``config.unet`` (an SD1.5 ``unet/``)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config.unet)
    return {name: tuple(t.shape) for name, t in unet.state_dict().items()}


# ---- comparing and reporting ---------------------------------------------------------------------

@dataclass
class LayoutReport:
    """Difference between the tensors a model expects and those a file holds."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    expected_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)
    actual_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)


def compare_layout(expected: Mapping[str, Any], actual: Mapping[str, Any]) -> LayoutReport:
    """Compare two ``{name: shape}`` maps (values may be shapes, :class:`TensorSpec` or tensors)."""
    exp = {name: _shape_of(v) for name, v in expected.items()}
    act = {name: _shape_of(v) for name, v in actual.items()}
    return LayoutReport(
        missing=[n for n in exp if n not in act],
        unexpected=[n for n in act if n not in exp],
        mismatched=[(n, exp[n], act[n]) for n in exp if n in act and exp[n] != act[n]],
        expected_shapes=exp,
        actual_shapes=act,
    )


@dataclass
class KeyGroup:
    """Keys that differ only in their numeric path components, e.g. ``down_blocks.{0-2}.attentions.{0,1}``."""

    pattern: str
    count: int
    details: list[str] = field(default_factory=list)  # distinct shape descriptions, in key order


def group_keys(keys: Iterable[str], details: Mapping[str, str] | None = None,
               depth: int | None = None) -> list[KeyGroup]:
    """Group keys whose paths differ only in numbers. `depth` merges further: each key is cut after its
    `depth`-th named (non-numeric) component and the indices right after it (marked ``.*``), so that
    ``mid_block.motion_modules.0`` and ``down_blocks.1.motion_modules.0`` are cut at the same level.
    Groups keep the order of their first key; cut groups carry no shape details."""
    slots: dict[tuple[str, ...], list[set[int]]] = {}
    counts: Counter[tuple[str, ...]] = Counter()
    shapes: dict[tuple[str, ...], list[str]] = {}
    for key in keys:
        parts = _cut(key.split("."), depth)
        pattern = tuple("#" if p.isdigit() else p for p in parts)
        numbers = [int(p) for p in parts if p.isdigit()]
        if pattern not in slots:
            slots[pattern] = [set() for _ in numbers]
            shapes[pattern] = []
        for slot, number in zip(slots[pattern], numbers):
            slot.add(number)
        counts[pattern] += 1
        if details is not None and key in details and parts[-1] != "*" and details[key] not in shapes[pattern]:
            shapes[pattern].append(details[key])
    groups = []
    for pattern, index_sets in slots.items():
        rendered = iter(_format_indices(sorted(s)) for s in index_sets)
        text = ".".join(next(rendered) if p == "#" else p for p in pattern)
        groups.append(KeyGroup(text, counts[pattern], shapes[pattern]))
    return groups


def group_keys_within(keys: Sequence[str], limit: int,
                      details: Mapping[str, str] | None = None) -> list[KeyGroup]:
    """Like :func:`group_keys`, but merge into coarser groups until at most `limit` remain."""
    groups = group_keys(keys, details)
    depth = max((_named_depth(k) for k in keys), default=1) - 1
    while len(groups) > limit and depth >= 1:
        groups = group_keys(keys, details, depth)
        depth -= 1
    return groups


def _named_depth(key: str) -> int:
    return sum(not p.isdigit() for p in key.split("."))


def _cut(parts: list[str], depth: int | None) -> list[str]:
    if depth is None or sum(not p.isdigit() for p in parts) <= depth:
        return parts
    named = 0
    for i, part in enumerate(parts):
        if not part.isdigit():
            if named == depth:
                return parts[:i] + ["*"]
            named += 1
    return parts


def format_report(report: LayoutReport, limit: int = 12) -> str:
    """Human-readable summary of a :class:`LayoutReport`: at most `limit` pattern lines per section."""
    if report.ok:
        return "layout OK"
    sections = []
    exp, act = report.expected_shapes, report.actual_shapes
    if report.missing:
        sections.append(_format_section("missing", report.missing, limit,
                                        {k: _fmt_shape(exp[k]) for k in report.missing if k in exp}))
    if report.unexpected:
        sections.append(_format_section("unexpected", report.unexpected, limit,
                                        {k: _fmt_shape(act[k]) for k in report.unexpected if k in act}))
    if report.mismatched:
        names = [name for name, _, _ in report.mismatched]
        details = {n: f"expected {_fmt_shape(e)}, got {_fmt_shape(g)}" for n, e, g in report.mismatched}
        sections.append(_format_section("wrong shape for", names, limit, details))
    return "\n".join(sections)


def _format_section(title: str, keys: Sequence[str], limit: int, details: Mapping[str, str]) -> str:
    groups = group_keys_within(keys, limit, details)
    noun = "key" if len(keys) == 1 else "keys"
    plural = "pattern" if len(groups) == 1 else "patterns"
    lines = [f"{title} {len(keys)} {noun} in {len(groups)} {plural}:"]
    for group in groups[:limit]:
        shown = "; ".join(group.details[:3]) + ("; ..." if len(group.details) > 3 else "")
        lines.append(f"  {group.pattern}  x{group.count}" + (f"  {shown}" if shown else ""))
    if len(groups) > limit:
        rest = sum(g.count for g in groups[limit:])
        lines.append(f"  ... and {len(groups) - limit} more patterns ({rest} keys)")
    return "\n".join(lines)


def check_layout(path: str | Path, layout: Mapping[str, Any], config: NetConfig,
                 expected: Mapping[str, tuple[int, ...]] | None = None) -> None:
    """Raise :class:`CheckpointError` unless `layout` is exactly the EmoCAST layout for `config`
    (`expected`: that layout, when the caller has already built it)."""
    expected = expected_layout(config) if expected is None else expected
    report = compare_layout(expected, layout)
    if report.ok:
        return
    problem = (f"does not match the {describe_config(config)} (expected {len(expected)} tensors, "
               f"the file has {len(layout)}: {len(report.missing)} missing, {len(report.unexpected)} "
               f"unexpected, {len(report.mismatched)} with another shape).")
    if not any(name.split(".", 1)[0] in TOP_LEVEL_MODULES for name in layout):
        problem += (" None of its keys starts with " + "/".join(f"{m}." for m in TOP_LEVEL_MODULES)
                    + ": this is not an EmoCAST net.pth (a bare SD UNet or motion-module file?).")
    else:
        other = _matching_builtin(layout, config)
        problem += (f" It matches the {other} instead: pass that config." if other else
                    " Use the official net.pth (or a file converted from it), or pass the model config "
                    "these weights were trained with.")
    raise CheckpointError(path, problem, report)


def _matching_builtin(layout: Mapping[str, Any], config: NetConfig) -> str | None:
    """Name of a built-in config other than `config` whose layout `layout` has, if any."""
    for builtin in (NetConfig.full(), NetConfig.tiny()):
        if builtin != config and compare_layout(expected_layout(builtin), layout).ok:
            return describe_config(builtin)
    return None


def describe_config(config: NetConfig) -> str:
    if config == NetConfig.full():
        return "full-size EmoCAST config"
    if config == NetConfig.tiny():
        return "tiny test config"
    unet = config.unet
    return (f"custom config (block_out_channels={list(unet.get('block_out_channels', []))}, "
            f"layers_per_block={unet.get('layers_per_block')})")


# ---- loading -------------------------------------------------------------------------------------

def load_state_dict(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a weights file (``weights_only`` for pickles); corrupt files raise CheckpointError."""
    path = _existing_file(path)
    if not _is_safetensors(path):
        return _torch_load(path, device)
    read_safetensors_header(path)  # clear error for truncated files before the reader's own
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(path, f"cannot be read as safetensors: {exc}") from exc


def resolve_config(path: str | Path, config: NetConfig | str | Path | None = None) -> NetConfig:
    """The model config for a weights file: the one given, else the one stored in the file, else full size."""
    if isinstance(config, NetConfig):
        return config
    if config is not None:
        return NetConfig.from_json(config)
    stored = read_metadata(path).get("emocast_config")
    if stored:
        try:
            return NetConfig.from_dict(json.loads(stored))
        except (json.JSONDecodeError, ValueError) as exc:
            raise CheckpointError(path, f"carries an unreadable emocast_config metadata entry: {exc}") from exc
    return NetConfig.full()


def load_net(path: str | Path, config: NetConfig | str | Path | None = None,
             device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "EmoCASTNet":
    """Build the networks and load a ``net.pth`` / converted safetensors file into them, strictly.

    The layout is checked first (grouped error); then every floating tensor is cast to `dtype` and
    assigned to the meta-built networks (no random init of 2.5 B parameters that would be overwritten).
    """
    from .models.net import build_net

    path = _existing_file(path)
    config = resolve_config(path, config)
    net = build_net(config, device="meta")
    check_layout(path, read_layout(path), config, {n: tuple(t.shape) for n, t in net.state_dict().items()})
    state = {name: _cast(t, dtype) for name, t in load_state_dict(path, device).items()}
    net.load_state_dict(state, strict=True, assign=True)
    left_on_meta = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if left_on_meta:
        # Non-persistent buffers are not in any file; build_net must not create them lazily on meta.
        raise RuntimeError(f"loading {path} left tensors without data (not part of the state dict): "
                           + ", ".join(g.pattern for g in group_keys(left_on_meta)))
    return net


# ---- writing -------------------------------------------------------------------------------------

def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | Path,
                     dtype: torch.dtype | str | None = None, metadata: Mapping[str, str] | None = None) -> Path:
    """Write one safetensors file (floating tensors cast to `dtype` when given), atomically: the data
    goes to a temporary file in the same folder that is renamed only once complete."""
    from safetensors.torch import save_file

    path = Path(path)
    target = parse_dtype(dtype)
    tensors: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        tensor = _cast(tensor.detach(), target).to("cpu").contiguous()
        tensors[name] = _own_storage(tensor, seen_storages)
    meta = {"format": "pt", **(dict(metadata) if metadata else {})}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        save_file(tensors, tmp, metadata=meta)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def convert(src: str | Path, dst: str | Path, dtype: torch.dtype | str | None = None,
            config: NetConfig | str | Path | None = None) -> Path:
    """``net.pth`` (or any EmoCAST weights file) -> single-file safetensors carrying the model config.

    The source layout is checked first, so the output always loads with :func:`load_net`.
    `dtype` None keeps the stored dtypes (a bit-identical copy).
    """
    src, dst = _existing_file(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise ValueError(f"convert: source and destination are the same file ({src}); choose another output")
    if not _is_safetensors(dst):
        raise ValueError(f"convert: the output {dst} must end in .safetensors")
    config = resolve_config(src, config)
    check_layout(src, read_layout(src), config)
    state = load_state_dict(src)
    save_safetensors(state, dst, dtype, metadata={"emocast_config": json.dumps(config.to_dict())})
    logger.info("wrote %s (%d tensors, %s)", dst, len(state), parse_dtype(dtype) or "stored dtypes")
    return dst


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPE_ALIASES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use fp16, bf16 or fp32") from None


# ---- training start: SD1.5 + AnimateDiff -----------------------------------------------------------

def init_from_pretrained(config: NetConfig, sd15_unet_dir: str | Path,
                         motion_module_ckpt: str | Path | None = None, *,
                         device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> "EmoCASTNet":
    """The untrained networks as training starts: SD1.5 UNet weights in both UNets (the reference UNet
    has no output head), AnimateDiff motion modules in the denoising UNet, fresh init elsewhere."""
    from .models.net import build_net

    unet_dir = _unet_folder(sd15_unet_dir)
    check_unet_config(unet_dir / "config.json", config)
    weights = _unet_weights_file(unet_dir)
    report = compare_layout(stock_unet_layout(config), read_layout(weights))
    if not report.ok:
        raise CheckpointError(weights, "is not the diffusers UNet2DConditionModel of this config", report)

    net = build_net(config, device=device, dtype=dtype)
    own = {name: tuple(t.shape) for name, t in net.state_dict().items()}
    updates: dict[str, torch.Tensor] = {}
    for name, tensor in load_state_dict(weights).items():
        updates[f"denoising_unet.{name}"] = tensor
        if not name.startswith(_REFERENCE_UNET_DROPS):
            updates[f"reference_unet.{name}"] = tensor
    n_sd = len(updates)
    if motion_module_ckpt is not None:
        updates.update(_motion_module_updates(Path(motion_module_ckpt), own))
    n_motion = len(updates) - n_sd

    misplaced = compare_layout({k: own[k] for k in updates if k in own}, updates)
    if misplaced.unexpected or misplaced.mismatched:  # the networks break their own naming contract
        raise RuntimeError("the EmoCAST networks do not match the SD1.5 UNet naming:\n" + format_report(misplaced))
    net.load_state_dict(updates, strict=False)  # copies into the fresh tensors, casting to their dtype
    logger.info("init_from_pretrained: %d tensors from %s (into both UNets), %d from %s, "
                "%d of %d keep their fresh init", n_sd, weights, n_motion,
                motion_module_ckpt or "no motion-module file", len(own) - len(updates), len(own))
    return net


def check_unet_config(config_json: str | Path, config: NetConfig) -> None:
    """Raise ValueError if a diffusers ``unet/config.json`` differs from ``config.unet`` in any field
    that changes tensor names or shapes."""
    config_json = Path(config_json)
    try:
        folder = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the UNet config {config_json}: {exc}") from exc
    defaults = _unet_defaults()
    diffs = []
    for name in _UNET_SHAPE_FIELDS:
        have = _plain(folder.get(name, defaults.get(name)))
        want = _plain(config.unet.get(name, defaults.get(name)))
        if have != want:
            diffs.append(f"{name}: folder has {have!r}, model config has {want!r}")
    if diffs:
        raise ValueError(f"{config_json} does not describe the UNet of the {describe_config(config)} "
                         "(fields that change tensor shapes differ: " + "; ".join(diffs)
                         + "). Use the SD1.5 unet/ folder the model config was written for.")


def _motion_module_updates(path: Path, own: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    prefix = "denoising_unet."
    expected = {k[len(prefix):]: s for k, s in own.items() if k.startswith(prefix) and ".motion_modules." in k}
    if not expected:
        raise ValueError(f"{path}: the model config has no motion modules (use_motion_module is false)")
    report = compare_layout(expected, read_layout(path))
    if not report.ok:
        raise CheckpointError(path, f"is not an AnimateDiff v2 motion-module file for this UNet (expected "
                                    f"{len(expected)} motion-module tensors, e.g. mm_sd_v15_v2.ckpt)", report)
    return {prefix + name: t for name, t in load_state_dict(path).items()}


def _unet_folder(path: str | Path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        return path / "unet"  # the whole SD1.5 repository was given
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a diffusers UNet folder (no config.json); pass the SD1.5 "
                                "unet/ folder")
    return path


def _unet_weights_file(unet_dir: Path) -> Path:
    for name in _SD_WEIGHT_NAMES:
        if (unet_dir / name).is_file():
            return unet_dir / name
    raise FileNotFoundError(f"no UNet weights in {unet_dir} (looked for {', '.join(_SD_WEIGHT_NAMES)})")


def _unet_defaults() -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    params = pyinspect.signature(UNet2DConditionModel.__init__).parameters.values()
    return {p.name: p.default for p in params if p.default is not pyinspect.Parameter.empty}


def _plain(value: Any) -> Any:
    """JSON-comparable form: tuples as lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- inspection ----------------------------------------------------------------------------------

@dataclass
class ModuleStats:
    tensors: int = 0
    elements: int = 0
    bytes: int = 0


@dataclass
class LayoutSummary:
    total: ModuleStats
    per_module: dict[str, ModuleStats]
    dtypes: Counter[str]


def summarize_layout(layout: Mapping[str, TensorSpec]) -> LayoutSummary:
    """Tensor, element and byte counts per top-level module, and how many tensors have each dtype."""
    total, per_module, dtypes = ModuleStats(), {}, Counter()
    for name, spec in layout.items():
        numel = math.prod(spec.shape)
        nbytes = numel * _itemsize(spec.dtype)
        for stats in (total, per_module.setdefault(name.split(".", 1)[0], ModuleStats())):
            stats.tensors += 1
            stats.elements += numel
            stats.bytes += nbytes
        dtypes[spec.dtype] += 1
    order = {name: i for i, name in enumerate(TOP_LEVEL_MODULES)}
    per_module = dict(sorted(per_module.items(), key=lambda item: order.get(item[0], len(order))))
    return LayoutSummary(total, per_module, dtypes)


def format_summary(summary: LayoutSummary) -> str:
    lines = [f"{'module':<16}{'tensors':>9}{'elements':>16}{'MB':>11}"]
    for name, stats in [*summary.per_module.items(), ("total", summary.total)]:
        lines.append(f"{name:<16}{stats.tensors:>9}{stats.elements:>16,}{stats.bytes / 2**20:>11.1f}")
    lines.append("dtypes: " + ", ".join(f"{d} x{n}" for d, n in summary.dtypes.most_common()))
    return "\n".join(lines)


# ---- helpers -------------------------------------------------------------------------------------

def _existing_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def _is_safetensors(path: Path) -> bool:
    return path.suffix.lower() in SAFETENSORS_SUFFIXES


def _torch_load(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if path.suffix.lower() not in PICKLE_SUFFIXES:
        raise CheckpointError(path, "has an unknown extension; expected "
                                    + ", ".join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES))
    try:
        # mmap only works for the zip format (torch >= 1.6); legacy pickles are read whole.
        obj = torch.load(path, map_location=device, weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, "holds objects other than tensors and plain containers; refusing to "
                                    f"unpickle it (weights_only): {exc}") from exc
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
    if end - begin != math.prod(shape) * _itemsize(dtype):
        raise CheckpointError(path, f"is corrupt: tensor {name!r} {list(shape)} {dtype} has "
                                    f"{end - begin} bytes of data")
    return TensorSpec(shape, dtype)


def _shape_of(value: Any) -> tuple[int, ...]:
    if isinstance(value, TensorSpec):
        return value.shape
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    return tuple(int(v) for v in value)


def _fmt_shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(s) for s in shape) + "]"


def _format_indices(values: list[int]) -> str:
    """[3] -> "3"; [0, 1] -> "{0,1}"; [0, 1, 2] -> "{0-2}"; [0, 2, 3, 4] -> "{0,2-4}"."""
    if len(values) == 1:
        return str(values[0])
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    parts = []
    for run in runs:
        parts.extend([f"{run[0]}-{run[-1]}"] if len(run) >= 3 else [str(v) for v in run])
    return "{" + ",".join(parts) + "}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _itemsize(dtype_name: str) -> int:
    return getattr(torch, dtype_name).itemsize


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
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
