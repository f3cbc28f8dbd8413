"""Stopped and killed command-line runs: SIGTERM is handled like Ctrl-C (exit 143, partial file deleted), and
the partial file a SIGKILL leaves is removed by the next run to the same output."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from emocast_core.cli import main
from file_helpers import listing
from emocast_core.cli.selftest import write_wav
from emocast_core.cli.table import EXIT_TERMINATED, Command, build_parser, run_cli
from emocast_core.testing.speech import synthesize_speech
from emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models
from emocast_core.video import read_video

pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals")


# ---- run_cli's SIGTERM handling, in-process ---------------------------------------------------------------------

def _cli(run) -> argparse.ArgumentParser:
    return build_parser([Command("work", "a command for the test", run)], "test", "test")


def test_sigterm_exits_143_after_the_commands_clean_up(capsys):
    events = []

    def work(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)  # interrupted: the handler raises
            events.append("not interrupted")
        finally:
            os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM must not interrupt the clean-up
            time.sleep(0.05)
            events.append("cleaned up")
        return 0

    def previous(signum, frame):
        events.append("previous handler")

    old = signal.signal(signal.SIGTERM, previous)
    try:
        assert run_cli(_cli(work), ["work"]) == EXIT_TERMINATED == 143
        assert signal.getsignal(signal.SIGTERM) is previous  # restored after the command
    finally:
        signal.signal(signal.SIGTERM, old)
    assert events == ["cleaned up"]
    assert capsys.readouterr().err == "terminated (SIGTERM): no output was written\n"


def test_handler_is_only_installed_while_a_command_runs():
    seen = []

    def work(args):
        seen.append(signal.getsignal(signal.SIGTERM))
        return 0

    before = signal.getsignal(signal.SIGTERM)
    assert run_cli(_cli(work), ["work"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before and seen[0] is not before and callable(seen[0])


def test_an_ignored_sigterm_stays_ignored():
    def work(args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        return 0

    old = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert run_cli(_cli(work), ["work"]) == 0
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, old)


# ---- real `python -m emocast_core generate` processes ------------------------------------------------------------

@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("interrupted")
    previous = os.umask(0o022)  # the usual default; test_tiny_models_get_the_umask_permissions checks it is used
    try:
        models = write_tiny_models(root / "models")
    finally:
        os.umask(previous)
    Image.fromarray(data.astronaut()).save(root / "portrait.jpg")
    speech = synthesize_speech("Good morning to you.")
    write_wav(root / "short.wav", speech, 16000)
    write_wav(root / "long.wav", np.tile(speech, 10), 16000)  # ~9 s: 28 clips of 8 frames
    return root, models


def _generate_args(root: Path, models: Path, audio: str, out: Path, steps: int) -> list[str]:
    return ["-q", "generate", "--models", str(models), "--image", str(root / "portrait.jpg"),
            "--audio", str(root / audio), "--out", str(out), "--steps", str(steps), "--size", str(TINY_SIZE),
            "--clip-length", "8", "--device", "cpu"]


def _start_long_run(root: Path, models: Path, out: Path) -> subprocess.Popen:
    """A CLI run of many minutes, returned once it is writing its video (its partial file exists)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a 2-core CI machine: leave one core to the test itself
    proc = subprocess.Popen([sys.executable, "-m", "emocast_core", *_generate_args(root, models, "long.wav", out, 40)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    partial = out.parent / f".{out.name}.{proc.pid}.partial"
    deadline = time.monotonic() + 240
    while not partial.exists():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it started writing:\n{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("the run did not start writing its video within 240 s")
        time.sleep(0.05)
    time.sleep(1.0)  # well inside the first clip's 40 steps
    assert proc.poll() is None, "the run ended before it could be signalled"
    return proc


def test_tiny_models_get_the_umask_permissions(inputs):
    # A model folder shared with another user (a ComfyUI service account) must be readable: 0644, not 0600.
    _, models = inputs
    modes = {str(p.relative_to(models)): oct(p.stat().st_mode & 0o777) for p in models.rglob("*") if p.is_file()}
    assert "emocast.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_sigterm_mid_run_exits_143_and_leaves_nothing(inputs):
    root, models = inputs
    out = root / "terminated" / "talking.mp4"
    proc = _start_long_run(root, models, out)
    try:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.endswith("terminated (SIGTERM): no output was written\n"), err
    assert listing(out.parent) == []


def test_sigkill_leaves_a_named_partial_file_that_the_next_run_removes(inputs, caplog):
    root, models = inputs
    out = root / "killed" / "talking.mp4"
    proc = _start_long_run(root, models, out)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    partial = f".talking.mp4.{proc.pid}.partial"
    assert listing(out.parent) == [partial]  # recognisable: the output's name and the killed run's PID

    caplog.set_level(logging.INFO, logger="emocast_core.video")
    caplog.set_level(logging.INFO, logger="emocast_core.partial_files")
    assert main(_generate_args(root, models, "short.wav", out, 1)) == 0  # the next, complete run to the same --out
    assert listing(out.parent) == ["talking.mp4"]
    assert read_video(out)[0].shape == (23, TINY_SIZE, TINY_SIZE, 3)
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("removed")]
    assert len(removed) == 1 and removed[0].startswith(f"removed {out.parent / partial} (")
    assert removed[0].endswith(f"a partial video left by process {proc.pid}, which no longer runs")
