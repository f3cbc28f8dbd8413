"""Video output: frames + speech -> MP4 (H.264 + AAC), read back; exact timing, quantisation and atomic writes."""
from __future__ import annotations

import logging
import os
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from emocast_core.preprocess.audio import AudioClip
from file_helpers import dead_pid, listing, umask
from emocast_core.video import VideoWriter, frames_to_uint8, read_video, write_video

T, H, W, FPS = 10, 48, 64, 25


def smooth_frames(num: int = T, height: int = H, width: int = W) -> torch.Tensor:
    """(num, 3, H, W) colour gradients that move visibly from frame to frame (so a repeat would show)."""
    y = torch.linspace(0, 1, height).view(1, height, 1)
    x = torch.linspace(0, 1, width).view(1, 1, width)
    t = torch.arange(num, dtype=torch.float32).view(num, 1, 1) / max(num - 1, 1)
    red = 0.1 + 0.5 * x + 0.35 * t
    green = 0.1 + 0.5 * y + 0.35 * (1 - t)
    blue = 0.5 + 0.3 * torch.sin(torch.pi * (x + y + t))
    return torch.stack([red.expand(num, height, width), green.expand(num, height, width), blue], dim=1)


def tone_clip(seconds: float, rate: int, freqs: tuple[float, ...]) -> AudioClip:
    """One amplitude-modulated tone per channel: distinct channels, so a swap or lag would show."""
    n = round(seconds * rate)
    t = torch.arange(n, dtype=torch.float64) / rate
    envelope = 0.3 + 0.2 * torch.sin(2 * torch.pi * 5 * t)
    waves = [envelope * torch.sin(2 * torch.pi * f * t) for f in freqs]
    return AudioClip(torch.stack(waves).float(), rate)


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    n = min(a.shape[-1], b.shape[-1])
    return float(np.corrcoef(a[..., :n].numpy(), b[..., :n].numpy())[0, 1])


@pytest.mark.parametrize("rate,freqs", [(16000, (440.0,)), (44100, (440.0, 660.0))], ids=["16k-mono", "44k-stereo"])
def test_round_trip_frames_timing_and_audio(tmp_path: Path, rate: int, freqs: tuple[float, ...]) -> None:
    frames = smooth_frames()
    clip = tone_clip(T / FPS, rate, freqs)
    out = write_video(tmp_path / "clip.mp4", frames, fps=FPS, audio=clip)
    assert out == tmp_path / "clip.mp4" and listing(tmp_path) == ["clip.mp4"]

    decoded, fps, audio = read_video(out)
    expected = frames_to_uint8(frames).astype(np.float32)
    assert decoded.shape == (T, H, W, 3) and decoded.dtype == np.uint8
    assert fps == FPS
    per_frame_error = np.abs(decoded.astype(np.float32) - expected).mean(axis=(1, 2, 3))
    # Consecutive inputs differ far more than the coding error, so a repeated or dropped frame would fail.
    assert (np.abs(np.diff(expected, axis=0)).mean(axis=(1, 2, 3)) > 10).all()
    assert (per_frame_error < 3).all(), per_frame_error

    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        times = [float(f.pts * f.time_base) for f in container.decode(stream)]
    assert times == pytest.approx([i / FPS for i in range(T)], abs=1e-6)

    assert audio is not None
    assert audio.sample_rate == rate and audio.num_channels == len(freqs)
    assert abs(audio.num_samples - round(T / FPS * rate)) <= 1024  # the track lasts as long as the frames
    for channel in range(len(freqs)):
        assert correlation(audio.waveform[channel], clip.waveform[channel]) > 0.95


def test_audio_is_cut_or_padded_to_the_video_length(tmp_path: Path) -> None:
    rate = 16000
    target = round(T / FPS * rate)
    long_clip = tone_clip(1.0, rate, (300.0,))
    _, _, audio = read_video(write_video(tmp_path / "long.mp4", smooth_frames(), audio=long_clip))
    assert abs(audio.num_samples - target) <= 1024
    assert correlation(audio.waveform[0], long_clip.waveform[0, :target]) > 0.95

    short_clip = tone_clip(0.2, rate, (300.0,))
    _, _, audio = read_video(write_video(tmp_path / "short.mp4", smooth_frames(), audio=short_clip))
    assert abs(audio.num_samples - target) <= 1024
    half = short_clip.num_samples
    speech_rms = audio.waveform[0, 1024 : half - 1024].square().mean().sqrt()
    padding_rms = audio.waveform[0, half + 1024 :].square().mean().sqrt()
    assert speech_rms > 0.1 and padding_rms < 0.01


def test_frames_to_uint8_truncates_like_the_release() -> None:
    values = torch.tensor([0.0, 1 / 255, 0.5, 0.999, 1.0, 1.5, -0.2, 0.7])
    frames = values.view(1, 1, 1, 8).expand(2, 3, 1, 8).clone()
    frames[1] = 1.0 - frames[1].clamp(0, 1)
    result = frames_to_uint8(frames)
    assert result.shape == (2, 1, 8, 3) and result.dtype == np.uint8
    # floor(255·x) after clamping: 0.5 -> 127 (not 128) and 0.999 -> 254, exactly the release's cast.
    assert result[0, 0, :, 0].tolist() == [0, 1, 127, 254, 255, 255, 0, 178]
    assert (result[..., 0] == result[..., 2]).all()
    expected_second = np.floor(np.float32(255) * (1 - values.clamp(0, 1).numpy())).astype(np.uint8)
    assert result[1, 0, :, 1].tolist() == expected_second.tolist()


def test_streaming_chunks_of_any_supported_layout(tmp_path: Path) -> None:
    frames = smooth_frames()
    as_uint8 = frames_to_uint8(frames)

    def source():
        yield frames[:3]  # torch (N, 3, H, W) chunk
        yield frames[3]  # torch single frame (3, H, W)
        yield as_uint8[4]  # numpy uint8 single image (H, W, 3)
        yield as_uint8[5:8]  # numpy uint8 chunk
        yield frames[8:].permute(0, 2, 3, 1).numpy()  # numpy float images in [0, 1]

    out = write_video(tmp_path / "stream.mp4", source())
    decoded, fps, audio = read_video(out)
    assert decoded.shape == (T, H, W, 3) and fps == FPS and audio is None
    assert np.abs(decoded.astype(np.float32) - as_uint8).mean(axis=(1, 2, 3)).max() < 3


def test_odd_sizes_are_padded_by_edge_replication(tmp_path: Path) -> None:
    frames = smooth_frames(4, 47, 63)
    decoded, _, _ = read_video(write_video(tmp_path / "odd.mp4", frames))
    assert decoded.shape == (4, 48, 64, 3)
    source = frames_to_uint8(frames).astype(np.float32)
    assert np.abs(decoded[:, :47, :63].astype(np.float32) - source).mean() < 3
    # The added row/column repeats the last one (up to coding error), instead of a black border.
    assert np.abs(decoded[:, 47, :63].astype(np.float32) - source[:, 46]).mean() < 6
    assert np.abs(decoded[:, :47, 63].astype(np.float32) - source[:, :, 62]).mean() < 6


def test_parent_folders_are_created_and_existing_target_replaced(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "clip.mp4"
    write_video(target, smooth_frames(3))
    assert read_video(target)[0].shape[0] == 3
    write_video(target, smooth_frames(5))
    assert read_video(target)[0].shape[0] == 5
    assert listing(target.parent) == ["clip.mp4"]


def _failing_source(exc: BaseException):
    frames = smooth_frames()
    for i in range(3):
        yield frames[i]
    raise exc


@pytest.mark.parametrize("exc", [RuntimeError("decoder crashed"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_failure_mid_write_leaves_no_trace(tmp_path: Path, exc: BaseException) -> None:
    fresh = tmp_path / "fresh.mp4"
    with pytest.raises(type(exc)):
        write_video(fresh, _failing_source(exc), audio=tone_clip(0.4, 16000, (440.0,)))
    assert listing(tmp_path) == []

    existing = tmp_path / "existing.mp4"
    write_video(existing, smooth_frames(2))
    before = existing.read_bytes()
    with pytest.raises(type(exc)):
        write_video(existing, _failing_source(exc))
    assert listing(tmp_path) == ["existing.mp4"] and existing.read_bytes() == before


def test_writer_commits_only_on_clean_exit(tmp_path: Path) -> None:
    target = tmp_path / "clip.mp4"
    with pytest.raises(ValueError, match="boom"):
        with VideoWriter(target) as writer:
            writer.write(smooth_frames(2))
            assert target.exists() is False  # only the partial file, named after the target and this process
            assert listing(tmp_path) == [f".clip.mp4.{os.getpid()}.partial"]
            raise ValueError("boom")
    assert listing(tmp_path) == []
    with VideoWriter(target) as writer:
        writer.write(smooth_frames(2))
        writer.write(smooth_frames(2))
    assert writer.num_frames == 4 and read_video(target)[0].shape[0] == 4


@pytest.mark.parametrize(
    "frames,error,message",
    [
        (torch.zeros(0, 3, H, W), ValueError, "empty"),
        (torch.zeros(2, H, W, 3), ValueError, "permute"),
        (torch.zeros(2, 4, H, W), ValueError, r"\(T, 3, H, W\)"),
        (torch.zeros(2, 3, H, W, dtype=torch.uint8), ValueError, "float"),
        (torch.full((2, 3, H, W), float("nan")), ValueError, "NaN"),
        (np.zeros((2, H, W, 3), dtype=np.int32), ValueError, "uint8 or float"),
        (iter([]), ValueError, "no frames"),
        (iter([np.zeros((H, W, 3), np.uint8), np.zeros((H + 2, W, 3), np.uint8)]), ValueError, "same size"),
        ("frames.png", TypeError, "iterable"),
    ],
    ids=["empty", "channels-last", "four-channels", "integer-tensor", "nan", "int32-array", "empty-source", "size-change", "str"],
)
def test_bad_frames_are_rejected_and_leave_nothing(tmp_path: Path, frames, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        write_video(tmp_path / "bad.mp4", frames)
    assert listing(tmp_path) == []


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"fps": 0}, "fps"),
        ({"crf": 60}, "crf"),
        ({"preset": "turbo"}, "preset"),
        ({"audio": AudioClip(torch.full((1, 800), float("inf")), 16000)}, "NaN or infinite"),
    ],
    ids=["fps", "crf", "preset", "audio-inf"],
)
def test_bad_settings_are_rejected(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        write_video(tmp_path / "bad.mp4", smooth_frames(2), **kwargs)
    assert listing(tmp_path) == []


def test_bad_destinations(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.mp4"):
        write_video(tmp_path / "clip.avi", smooth_frames(2))
    (tmp_path / "folder.mp4").mkdir()
    with pytest.raises(IsADirectoryError, match="directory"):
        write_video(tmp_path / "folder.mp4", smooth_frames(2))
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(OSError, match="cannot create the output folder"):
        write_video(tmp_path / "file" / "clip.mp4", smooth_frames(2))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs a non-root POSIX user for permissions")
def test_unwritable_folder(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(PermissionError, match="not writable"):
            write_video(locked / "clip.mp4", smooth_frames(2))
    finally:
        locked.chmod(0o700)


def test_permission_error_names_the_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs as root too (where chmod cannot lock a folder): the partial file's creation is refused.
    real_open = Path.open

    def refuse_create(self: Path, mode: str = "r", *args, **kwargs):
        if "x" in mode:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", refuse_create)
    with pytest.raises(PermissionError, match=f"folder {tmp_path} is not writable"):
        write_video(tmp_path / "clip.mp4", smooth_frames(2))
    assert listing(tmp_path) == []


def test_failed_rename_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = write_video(tmp_path / "clip.mp4", smooth_frames(2))
    before = target.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk unplugged")

    monkeypatch.setattr("emocast_core.video.os.replace", broken_replace)
    with pytest.raises(OSError, match="disk unplugged"):
        write_video(target, smooth_frames(4))
    assert listing(tmp_path) == ["clip.mp4"] and target.read_bytes() == before


def test_read_video_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not found"):
        read_video(tmp_path / "missing.mp4")


def test_unusual_rate_and_channel_count_are_converted_for_aac(tmp_path: Path) -> None:
    # 22 kHz is not an AAC rate (22.05 kHz is) and AAC output is kept to mono/stereo.
    clip = tone_clip(T / FPS, 22000, (440.0, 440.0, 440.0))
    _, _, audio = read_video(write_video(tmp_path / "clip.mp4", smooth_frames(), audio=clip))
    assert audio.sample_rate == 22050 and audio.num_channels == 2
    assert abs(audio.num_samples - round(T / FPS * 22050)) <= 1024
    reference = tone_clip(T / FPS, 22050, (440.0,)).waveform[0]
    assert correlation(audio.waveform[0], reference) > 0.95 and correlation(audio.waveform[1], reference) > 0.95


# ---- partial files, permissions, replaced outputs, symbolic links ----------------------------------------------

@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)], ids=["022", "027"])
def test_finished_video_has_the_umask_permissions(tmp_path: Path, mask: int, mode: int) -> None:
    with umask(mask):
        out = write_video(tmp_path / "clip.mp4", smooth_frames(2))
    assert listing(tmp_path) == ["clip.mp4"]
    assert out.stat().st_mode & 0o777 == mode


def test_stale_partials_of_the_target_are_removed_on_the_next_write(tmp_path: Path, caplog) -> None:
    gone, own, alive = dead_pid(), os.getpid(), os.getppid()  # own: left by an earlier process with our PID
    names = {
        "dead": f".clip.mp4.{gone}.partial", "dead-second-writer": f".clip.mp4.{gone}-1.partial",
        "own-pid": f".clip.mp4.{own}.partial", "alive": f".clip.mp4.{alive}.partial",
        "other-target": f".other.mp4.{gone}.partial", "not-a-pid": ".clip.mp4.x1.partial",
        "old-scheme": ".clip.1a2b3c4d.partial.mp4",
    }
    for name in names.values():
        (tmp_path / name).write_bytes(b"half a video")
    caplog.set_level(logging.INFO, logger="emocast_core.video")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    write_video(tmp_path / "clip.mp4", smooth_frames(2))
    kept = [names[k] for k in ("alive", "other-target", "not-a-pid", "old-scheme")]
    assert listing(tmp_path) == sorted([*kept, "clip.mp4"])
    removed = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith("removed"))
    assert removed == sorted(
        f"removed {tmp_path / names[k]} (0.0 MB), a partial video left by process {pid}, which no longer runs"
        for k, pid in (("dead", gone), ("dead-second-writer", gone), ("own-pid", own)))


def test_two_writers_of_one_target_in_one_process_do_not_collide(tmp_path: Path) -> None:
    target = tmp_path / "clip.mp4"
    with VideoWriter(target) as first:
        first.write(smooth_frames(2))
        with VideoWriter(target) as second:  # must neither delete the first's partial file nor reuse it
            second.write(smooth_frames(3))
            pid = os.getpid()
            assert listing(tmp_path) == [f".clip.mp4.{pid}-1.partial", f".clip.mp4.{pid}.partial"]
        assert listing(tmp_path) == [f".clip.mp4.{pid}.partial", "clip.mp4"]
    assert listing(tmp_path) == ["clip.mp4"] and read_video(target)[0].shape[0] == 2  # the last to finish


def test_replacing_an_existing_video_is_logged(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="emocast_core.video")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    target = tmp_path / "clip.mp4"
    write_video(target, smooth_frames(2))
    assert [r.getMessage() for r in caplog.records] == []
    write_video(target, smooth_frames(3))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("INFO", f"{target} exists; it will be replaced when the new video is complete")]
    assert listing(tmp_path) == ["clip.mp4"] and read_video(target)[0].shape[0] == 3


@pytest.mark.skipif(os.name != "posix", reason="symbolic links need privileges on Windows")
@pytest.mark.parametrize("existing", [True, False], ids=["existing-target", "dangling-link"])
def test_a_symbolic_link_is_written_through_to_its_target(tmp_path: Path, caplog, existing: bool) -> None:
    (tmp_path / "store").mkdir()
    (tmp_path / "out").mkdir()
    real, link = tmp_path / "store" / "real.mp4", tmp_path / "out" / "link.mp4"
    if existing:
        real.write_bytes(b"old video")
    link.symlink_to(Path("..") / "store" / "real.mp4")
    caplog.set_level(logging.INFO, logger="emocast_core.video")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    with VideoWriter(link) as writer:
        writer.write(smooth_frames(2))
        # the partial file is beside the target, so the rename stays on the target's file system
        assert listing(tmp_path / "store") == [f".real.mp4.{os.getpid()}.partial", *(["real.mp4"] * existing)]
        assert listing(tmp_path / "out") == ["link.mp4"]
    assert writer.path == link
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "store", "real.mp4")
    assert listing(tmp_path / "out") == ["link.mp4"] and listing(tmp_path / "store") == ["real.mp4"]
    assert read_video(real)[0].shape[0] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"{link} is a symbolic link: writing to its target {real}"
    assert messages[1:] == ([f"{link} exists; it will be replaced when the new video is complete"] if existing else [])


@pytest.mark.skipif(os.name != "posix", reason="symbolic links need privileges on Windows")
def test_a_symbolic_link_loop_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a.mp4").symlink_to("b.mp4")
    (tmp_path / "b.mp4").symlink_to("a.mp4")
    with pytest.raises(OSError, match="a.mp4: it is a symbolic link that cannot be followed"):
        write_video(tmp_path / "a.mp4", smooth_frames(2))
    assert listing(tmp_path) == ["a.mp4", "b.mp4"]


@pytest.mark.parametrize("code, reason", [(28, "the disk is full"), (30, "the file system is read-only")])
def test_a_full_or_read_only_disk_names_the_output(tmp_path, monkeypatch, code, reason):
    """The error names the video asked for (not the hidden partial file) and leaves the folder as it was."""
    def fail(self, packets):
        raise OSError(code, os.strerror(code), str(self._partial))

    monkeypatch.setattr(VideoWriter, "_mux", fail)
    out = tmp_path / "talking.mp4"
    with pytest.raises(OSError) as info:
        write_video(out, smooth_frames())
    assert str(info.value) == (f"cannot write the video {out}: {reason}; free some space or choose another "
                               "output path")
    assert info.value.errno == code and ".partial" not in str(info.value)
    assert list(tmp_path.iterdir()) == []
