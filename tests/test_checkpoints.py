"""Checkpoint layout checks, strict loading, conversion and initialisation from SD1.5 + AnimateDiff."""
from __future__ import annotations

import io
import json
import logging
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FIXTURES
from file_helpers import dead_pid, listing, umask
from emocast_core import checkpoints as ck
from emocast_core.cli import main as cli_main
from emocast_core.checkpoints.layout import _format_indices
from emocast_core.config import NetConfig
from training.init_weights import init_from_pretrained

ROOT = Path(__file__).resolve().parents[1]
DOWN_TO_K = "denoising_unet.down_blocks.{0-2}.audio_modules.{0,1}.transformer_blocks.0.attn2_0.to_k.weight"
MOTION = ".motion_modules."


# ---- fixtures ------------------------------------------------------------------------------------

def _manifest(name: str) -> dict[str, tuple[int, ...]]:
    data = json.loads((FIXTURES / "manifests" / name).read_text())
    return {k: tuple(v) for k, v in data["keys"].items()}


@pytest.fixture(scope="module")
def full_keys() -> dict[str, tuple[int, ...]]:
    return _manifest("official_net_keys.json")


@pytest.fixture(scope="module")
def tiny() -> NetConfig:
    return NetConfig.tiny()


@pytest.fixture(scope="module")
def tiny_state(tiny: NetConfig) -> dict[str, torch.Tensor]:
    """A tiny state dict in the official layout with distinct random values; `pe` buffers set to a marker."""
    from emocast_core.models.net import build_net

    gen = torch.Generator().manual_seed(0)
    state = {}
    for name, t in build_net(tiny, device="meta").state_dict().items():
        if name.endswith("pos_encoder.pe"):
            state[name] = torch.full(t.shape, 0.375)  # not the sinusoid the networks build themselves
        else:
            state[name] = torch.randn(t.shape, generator=gen)
    return state


@pytest.fixture(scope="module")
def tiny_pth(tmp_path_factory, tiny_state) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "net.pth"
    torch.save(tiny_state, path)
    return path


def write_sparse_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "F16") -> None:
    """A real safetensors file with this layout whose data region is a hole: costs a header's worth of disk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)) + blob)
        fh.truncate(8 + len(blob) + offset)


# ---- grouping and reports (manifests only) ----------------------------------------------------------

@pytest.mark.parametrize("values,text", [([3], "3"), ([0, 1], "{0,1}"), ([0, 1, 2], "{0-2}"),
                                         ([0, 2, 3, 4], "{0,2-4}"), ([1, 3], "{1,3}")])
def test_format_indices(values, text):
    assert _format_indices(values) == text


def test_report_groups_dropped_keys_by_pattern(full_keys):
    dropped = [k for k in full_keys if k.startswith("denoising_unet.down_blocks")
               and k.endswith("attn2_0.to_k.weight")]
    assert len(dropped) == 6
    actual = {k: v for k, v in full_keys.items() if k not in dropped}
    actual["face_locator.conv_in.weight"] = (8, 3, 3, 3)
    actual["denoising_unet.mid_block.extra.0.weight"] = (4,)
    report = ck.compare_layout(full_keys, actual)
    assert report.missing == dropped and not report.ok
    assert report.unexpected == ["denoising_unet.mid_block.extra.0.weight"]
    assert report.mismatched == [("face_locator.conv_in.weight", (16, 3, 3, 3), (8, 3, 3, 3))]
    text = ck.format_report(report)
    assert f"missing 6 keys in 1 pattern:\n  {DOWN_TO_K}  x6  [320, 768]; [640, 768]; [1280, 768]" in text
    assert "unexpected 1 key in 1 pattern:\n  denoising_unet.mid_block.extra.0.weight  x1  [4]" in text
    assert "face_locator.conv_in.weight  x1  expected [16, 3, 3, 3], got [8, 3, 3, 3]" in text


def test_report_of_thousands_of_keys_stays_short(full_keys):
    report = ck.compare_layout(full_keys, {})
    text = ck.format_report(report, limit=12)
    assert text.splitlines()[0] == "missing 2832 keys in 5 patterns:"
    for module, n in [("reference_unet", 714), ("denoising_unet", 2090), ("audioproj", 8)]:
        assert f"  {module}.*  x{n}" in text
    motion_gone = {k: v for k, v in full_keys.items() if MOTION not in k}
    lines = ck.format_report(ck.compare_layout(full_keys, motion_gone), limit=12).splitlines()
    assert lines[0].startswith("missing 588 keys in ") and 2 <= len(lines) <= 13
    assert all(MOTION in line for line in lines[1:])
    assert sum(int(line.split("  x")[1].split()[0]) for line in lines[1:]) == 588


# ---- full-size layout from the header only --------------------------------------------------------

def test_full_size_sparse_file_is_checked_from_its_header(tmp_path, full_keys, capsys):
    good = tmp_path / "full.safetensors"
    write_sparse_safetensors(good, full_keys)
    assert good.stat().st_size > 4.9e9
    start = time.perf_counter()
    layout = ck.read_layout(good)
    assert time.perf_counter() - start < 1.0
    assert {k: s.shape for k, s in layout.items()} == full_keys
    assert {s.dtype for s in layout.values()} == {"float16"}

    assert cli_main(["inspect", str(good)]) == 0
    out = capsys.readouterr().out
    assert "2832 tensors" in out and "layout matches the full-size EmoCAST config" in out
    assert "float16 x2832" in out and "reference_unet" in out

    bad = tmp_path / "bad.safetensors"
    shapes = dict(full_keys)
    del shapes["imageproj.norm.bias"]
    shapes["audioproj.proj1.weight"] = (512, 100)
    write_sparse_safetensors(bad, shapes)
    assert cli_main(["inspect", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "missing 1 key in 1 pattern:\n  imageproj.norm.bias  x1  [768]" in out
    assert "audioproj.proj1.weight  x1  expected [512, 46080], got [512, 100]" in out
    assert str(bad) in out


def test_truncated_safetensors_is_rejected_from_the_header(tmp_path, full_keys):
    path = tmp_path / "cut.safetensors"
    write_sparse_safetensors(path, full_keys)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size - 1)
    with pytest.raises(ck.CheckpointError, match=r"cut\.safetensors: is truncated: tensor '.*'"):
        ck.read_layout(path)
    path.write_bytes(b"\x10\x00")
    with pytest.raises(ck.CheckpointError, match="cut.safetensors: is not a safetensors file"):
        ck.read_layout(path)


# ---- tiny networks: strict loading, conversion ----------------------------------------------------

def test_expected_layout_is_the_official_tiny_layout(tiny):
    assert ck.expected_layout(tiny) == _manifest("official_net_keys_tiny.json")


def test_pth_loads_strictly_with_buffers_from_the_file(tiny_pth, tiny_state, tiny):
    net = ck.load_net(tiny_pth, tiny)
    loaded = net.state_dict()
    assert loaded.keys() == tiny_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in tiny_state.items())
    pe = [b for n, b in net.named_buffers() if n.endswith("pos_encoder.pe")]
    assert len(pe) == 26 and all(torch.all(b == 0.375) for b in pe)
    assert {p.dtype for p in net.parameters()} == {torch.float32}
    assert not any(t.is_meta for t in loaded.values())


@pytest.mark.parametrize("dtype,torch_dtype", [("fp32", torch.float32), ("fp16", torch.float16)])
def test_convert_round_trips_bit_identically(tmp_path, tiny_pth, tiny_state, tiny, dtype, torch_dtype):
    dst = ck.convert(tiny_pth, tmp_path / "net.safetensors", dtype=dtype, config=tiny)
    assert [p.name for p in tmp_path.iterdir()] == ["net.safetensors"]  # no temporary left behind
    back = ck.load_state_dict(dst)
    assert back.keys() == tiny_state.keys()
    for name, tensor in tiny_state.items():
        assert back[name].dtype == torch_dtype
        assert torch.equal(back[name], tensor.to(torch_dtype)), name
    meta = ck.read_metadata(dst)
    assert meta["format"] == "pt" and json.loads(meta["emocast_config"]) == tiny.to_dict()
    # same dtype again: bit-identical copy of the converted file
    again = ck.load_state_dict(ck.convert(dst, tmp_path / "again.safetensors"))
    assert all(torch.equal(again[k], v) for k, v in back.items())


def test_save_safetensors_handles_views_and_shared_storage(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = {"base": base, "tail": base[1:], "transposed": base.t(), "alias": base}
    path = ck.save_safetensors(state, tmp_path / "views.safetensors", dtype="bf16", metadata={"note": "x"})
    back = ck.load_state_dict(path)
    assert all(torch.equal(back[k], v.to(torch.bfloat16)) for k, v in state.items())
    assert ck.read_metadata(path) == {"format": "pt", "note": "x"}
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        ck.save_safetensors(state, tmp_path / "bad.safetensors", dtype="fp8")


def test_fp16_file_loads_into_fp32_with_its_stored_config(tmp_path, tiny_pth, tiny_state, tiny):
    dst = ck.convert(tiny_pth, tmp_path / "half.safetensors", dtype="fp16", config=tiny)
    net = ck.load_net(dst)  # config from the file's metadata
    assert net.config == tiny
    loaded = net.state_dict()
    assert {t.dtype for t in loaded.values()} == {torch.float32}
    name = "audioproj.proj1.weight"
    assert torch.equal(loaded[name], tiny_state[name].half().float())
    assert not torch.equal(loaded[name], tiny_state[name])  # really went through fp16


def test_wrong_layouts_fail_with_grouped_message(tmp_path, tiny_state, tiny):
    motion = [k for k in tiny_state if MOTION in k and k.endswith("proj_in.weight")]
    broken = {k: v for k, v in tiny_state.items() if k not in motion}
    broken["denoising_unet.conv_in.weight"] = torch.zeros(32, 8, 3, 3)
    broken["face_locator.extra.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(broken, path)
    with pytest.raises(ck.CheckpointError) as err:
        ck.load_net(path, tiny)
    text = str(err.value)
    assert len(motion) == 13
    assert text.startswith(f"{path}: does not match the tiny test config (expected 1798 tensors, "
                           "the file has 1786: 13 missing, 1 unexpected, 1 with another shape)")
    assert (f"missing 13 keys in 3 patterns:\n  denoising_unet.down_blocks.{{0-3}}.motion_modules.0."
            f"temporal_transformer.proj_in.weight  x4  [32, 32]; [64, 64]") in text
    assert "  face_locator.extra.weight  x1  [1]" in text
    assert "denoising_unet.conv_in.weight  x1  expected [32, 4, 3, 3], got [32, 8, 3, 3]" in text
    assert err.value.report.missing == motion


def test_wrapped_state_dict_with_ddp_prefix_is_accepted(tmp_path, tiny_state, tiny, caplog):
    path = tmp_path / "wrapped.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in tiny_state.items()}, "epoch": 3}, path)
    with caplog.at_level(logging.INFO, logger="emocast_core.checkpoints"):
        layout = ck.read_layout(path)
    assert "wrapped in a 'state_dict' entry" in caplog.text and "'module.' prefix" in caplog.text
    assert {k: s.shape for k, s in layout.items()} == {k: tuple(v.shape) for k, v in tiny_state.items()}
    net = ck.load_net(path, tiny)
    assert torch.equal(net.state_dict()["imageproj.norm.weight"], tiny_state["imageproj.norm.weight"])


def test_corrupt_and_foreign_files_name_the_file(tmp_path, tiny_pth, tiny):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_pth.read_bytes()[: tiny_pth.stat().st_size // 2])
    with pytest.raises(ck.CheckpointError, match=r"cut\.pth: cannot be read \(truncated or corrupt\?\)"):
        ck.load_net(cut, tiny)
    with pytest.raises(ck.CheckpointError, match=r"cut\.pth: cannot be read"):
        ck.load_state_dict(cut)
    bare = tmp_path / "bare_unet.pth"
    torch.save({"conv_in.weight": torch.zeros(1)}, bare)
    with pytest.raises(ck.CheckpointError, match="this is not an EmoCAST net.pth"):
        ck.load_net(bare, tiny)
    with pytest.raises(FileNotFoundError, match=r"weights file .*nope\.pth does not exist"):
        ck.load_net(tmp_path / "nope.pth", tiny)


# ---- initialisation from SD1.5 + AnimateDiff -------------------------------------------------------

@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory, tiny) -> tuple[Path, dict[str, torch.Tensor]]:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(1)
    unet = UNet2DConditionModel(**tiny.unet)
    folder = tmp_path_factory.mktemp("sd15") / "unet"
    unet.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return folder, {k: v.clone() for k, v in unet.state_dict().items()}


@pytest.fixture(scope="module")
def motion_ckpt(tmp_path_factory, tiny_state) -> tuple[Path, dict[str, torch.Tensor]]:
    motion = {k.removeprefix("denoising_unet."): v * 2 for k, v in tiny_state.items()
              if k.startswith("denoising_unet.") and MOTION in k}
    path = tmp_path_factory.mktemp("mm") / "mm_tiny.ckpt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in motion.items()}}, path)
    return path, motion


def test_init_from_pretrained_copies_sd_and_motion_weights(sd_folder, motion_ckpt, tiny, caplog):
    folder, sd = sd_folder
    mm_path, motion = motion_ckpt
    with caplog.at_level(logging.INFO, logger="training.init_weights"):
        net = init_from_pretrained(tiny, folder.parent, mm_path)  # the SD1.5 repo root works too
    state = net.state_dict()
    for name, tensor in sd.items():
        assert torch.equal(state[f"denoising_unet.{name}"], tensor), name
        if name.startswith(("conv_out.", "conv_norm_out.")):
            assert f"reference_unet.{name}" not in state
        else:
            assert torch.equal(state[f"reference_unet.{name}"], tensor), name
    for name, tensor in motion.items():
        assert torch.equal(state[f"denoising_unet.{name}"], tensor), name
    assert len(motion) == 13 * 28  # all motion modules of the tiny UNet, pe buffers included
    n_sd = len(sd) + len(sd) - 4
    assert (f"{n_sd} tensors from {folder / 'diffusion_pytorch_model.safetensors'} (into both UNets), "
            f"{len(motion)} from {mm_path}, {len(state) - n_sd - len(motion)} of {len(state)} keep") in caplog.text
    # what neither file provides keeps its init: the zero-initialised audio-module output convolutions
    zero_conv = [k for k in state if ".zero_conv_lip." in k]
    assert zero_conv and all(torch.count_nonzero(state[k]) == 0 for k in zero_conv)


def test_init_from_pretrained_rejects_foreign_files(tmp_path, sd_folder, motion_ckpt, tiny):
    folder, _ = sd_folder
    mm_path, motion = motion_ckpt
    partial = dict(motion)
    dropped = next(k for k in partial if k.endswith("ff_norm.bias"))
    del partial[dropped]
    bad_mm = tmp_path / "mm_bad.ckpt"
    torch.save(partial, bad_mm)
    with pytest.raises(ck.CheckpointError, match=rf"mm_bad\.ckpt: is not an AnimateDiff v2 motion-module "
                                                  rf"file(.|\n)*missing 1 key in 1 pattern:\n  {dropped}"):
        init_from_pretrained(tiny, folder, bad_mm)

    other = tmp_path / "unet"
    other.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_out_channels"] = [32, 64, 64, 64]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"block_out_channels: folder has \[32, 64, 64, 64\], "
                                         r"model config has \[32, 32, 64, 64\]"):
        init_from_pretrained(tiny, other, mm_path)


# ---- command line --------------------------------------------------------------------------------

def test_cli_convert_and_inspect_exit_codes(tmp_path, tiny_pth, tiny_state, capsys):
    good = tmp_path / "good.safetensors"
    assert cli_main(["convert", str(tiny_pth), str(good), "--tiny", "--dtype", "bf16"]) == 0
    assert ck.read_layout(good)["imageproj.proj.weight"].dtype == "bfloat16"
    assert cli_main(["convert", str(tiny_pth), str(tmp_path / "x.safetensors")]) == 1  # not full size
    err = capsys.readouterr().err
    assert "does not match the full-size EmoCAST config" in err and "matches the tiny test config instead" in err

    bad = tmp_path / "bad.pth"
    torch.save({k: v for k, v in tiny_state.items() if k != "audioproj.norm.weight"}, bad)
    # One real `python -m` run (the bad file: exit status 1 must survive sys.exit); the good file goes
    # through the same main() in-process, which saves a second torch + diffusers start-up (~8 s).
    assert cli_main(["inspect", str(good)]) == 0
    good_out = capsys.readouterr().out
    assert "1798 tensors" in good_out and "layout matches the tiny test config" in good_out
    run = subprocess.run([sys.executable, "-m", "emocast_core", "inspect", str(bad), "--tiny"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "missing 1 key in 1 pattern:\n  audioproj.norm.weight  x1  [768]" in run.stdout
    assert "dtypes: float32 x1797" in run.stdout


# ---- writing: partial files, permissions, replaced outputs, symbolic links ---------------------------------------

def test_our_safetensors_writer_is_byte_identical_to_the_reference():
    from safetensors.torch import save

    gen = torch.Generator().manual_seed(0)
    tensors = {f"t_{dtype}": (torch.randn(3, 2, generator=gen) * 9).to(getattr(torch, dtype))
               for dtype in ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
                             "uint8", "float8_e4m3fn", "float8_e5m2")}
    tensors.update(flag=torch.tensor([True, False]), scalar=torch.tensor(2.5), empty=torch.zeros(0, 3),
                   a_first_by_name=torch.ones(5, dtype=torch.float16))
    ours = io.BytesIO()
    metadata = {"emocast_config": json.dumps({"name": "tiny é", "sizes": [1, 2]})}  # one key: the reference
    ck.files._write_safetensors(ours, tensors, metadata)                             # orders several randomly
    assert ours.getvalue() == save(tensors, metadata=metadata)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_convert_output_has_the_umask_permissions(tmp_path, tiny_pth, tiny, mask, mode):
    with umask(mask):
        dst = ck.convert(tiny_pth, tmp_path / "net.safetensors", config=tiny)
        assert cli_main(["-q", "convert", str(tiny_pth), str(tmp_path / "cli.safetensors"), "--tiny"]) == 0
    assert listing(tmp_path) == ["cli.safetensors", "net.safetensors"]
    assert dst.stat().st_mode & 0o777 == mode and (tmp_path / "cli.safetensors").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("stop", [OSError("No space left on device"), KeyboardInterrupt()], ids=["disk-full", "ctrl-c"])
def test_failed_convert_leaves_no_partial_file_and_keeps_the_old_output(tmp_path, tiny_pth, tiny, monkeypatch,
                                                                        stop):
    dst = tmp_path / "net.safetensors"
    dst.write_bytes(b"the previous conversion")
    seen = []

    def fail_half_way(fh, tensors, metadata):
        fh.write(b"x" * 1000)
        seen.extend(listing(tmp_path))
        raise stop

    monkeypatch.setattr(ck.files, "_write_safetensors", fail_half_way)
    with pytest.raises(type(stop)):
        ck.convert(tiny_pth, dst, config=tiny)
    assert seen == [f".net.safetensors.{os.getpid()}.partial", "net.safetensors"]
    assert listing(tmp_path) == ["net.safetensors"] and dst.read_bytes() == b"the previous conversion"


def test_stale_partial_files_are_removed_by_the_next_convert(tmp_path, tiny_pth, tiny, caplog):
    gone, alive = dead_pid(), os.getppid()
    stale, live = f".net.safetensors.{gone}.partial", f".net.safetensors.{alive}.partial"
    other, old = f".other.safetensors.{gone}.partial", ".net.safetensors.k2j4h5l1.tmp"  # old: mkstemp's names
    for name in (stale, live, other, old):
        (tmp_path / name).write_bytes(b"\0" * 3 * 2**20)
    caplog.set_level(logging.INFO, logger="emocast_core.checkpoints")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    ck.convert(tiny_pth, tmp_path / "net.safetensors", config=tiny)
    assert listing(tmp_path) == sorted([live, other, old, "net.safetensors"])
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")] == [
        f"removed {tmp_path / stale} (3.0 MB), a partial file left by process {gone}, which no longer runs"]


def test_replacing_an_existing_output_is_logged(tmp_path, tiny_pth, caplog):
    dst = tmp_path / "net.safetensors"
    caplog.set_level(logging.INFO, logger="emocast_core.checkpoints")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    assert cli_main(["-q", "convert", str(tiny_pth), str(dst), "--tiny"]) == 0
    assert not any("replaced" in r.getMessage() for r in caplog.records)
    caplog.clear()
    assert cli_main(["-q", "convert", str(tiny_pth), str(dst), "--tiny", "--dtype", "fp16"]) == 0
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "replaced" in r.getMessage()] == [
        ("INFO", f"{dst} exists; it will be replaced when the new file is complete")]
    assert listing(tmp_path) == ["net.safetensors"] and ck.read_layout(dst)["imageproj.proj.weight"].dtype == "float16"


@pytest.mark.skipif(os.name != "posix", reason="symbolic links need privileges on Windows")
def test_convert_writes_through_a_symbolic_link(tmp_path, tiny_pth, tiny, caplog, monkeypatch):
    store, models = tmp_path / "big_disk", tmp_path / "models"
    store.mkdir()
    models.mkdir()
    real, link = store / "emocast.safetensors", models / "emocast.safetensors"
    real.write_bytes(b"an older conversion")
    link.symlink_to(real)
    caplog.set_level(logging.INFO, logger="emocast_core.checkpoints")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    seen = []
    original = ck.files._write_safetensors

    def spy(fh, tensors, metadata):
        seen.append((listing(store), listing(models)))
        original(fh, tensors, metadata)

    monkeypatch.setattr(ck.files, "_write_safetensors", spy)
    assert ck.convert(tiny_pth, link, dtype="fp16", config=tiny) == link
    assert seen == [([f".emocast.safetensors.{os.getpid()}.partial", "emocast.safetensors"], ["emocast.safetensors"])]
    assert link.is_symlink() and link.resolve() == real
    assert listing(store) == ["emocast.safetensors"] and listing(models) == ["emocast.safetensors"]
    assert ck.read_layout(real)["imageproj.proj.weight"].dtype == "float16"
    messages = [r.getMessage() for r in caplog.records]
    assert f"{link} is a symbolic link: writing to its target {real}" in messages
    assert f"{link} exists; it will be replaced when the new file is complete" in messages
