"""`python -m emocast_core generate` / `selftest` on tiny models saved in the real formats."""
from __future__ import annotations

import math

import numpy as np
import pytest

from emocast_core.cli import main
from emocast_core.cli.selftest import selftest, write_wav
from emocast_core.model_paths import ModelPaths
from emocast_core.pipeline import GenerationCancelled, GenerationRequest, generate_video
from emocast_core.runtime import EmoCASTModels
from emocast_core.preprocess.audio import load_audio
from emocast_core.sampling_settings import SamplingSettings
from emocast_core.testing.speech import synthesize_speech
from emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models
from emocast_core.video import read_video


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image
    from skimage import data

    root = tmp_path_factory.mktemp("cli")
    models = write_tiny_models(root / "models")
    Image.fromarray(data.astronaut()).save(root / "portrait.jpg")
    speech = synthesize_speech("Good morning to you.")
    write_wav(root / "speech.wav", speech, 16000)
    return root, models


def _generate_args(root, models, out, *extra):
    return ["-q", "generate", "--models", str(models), "--image", str(root / "portrait.jpg"),
            "--audio", str(root / "speech.wav"), "--emotion", "a person talking happily", "--out", str(out),
            "--steps", "1", "--size", str(TINY_SIZE), "--clip-length", "8", "--device", "cpu", *extra]


def test_generate_writes_an_mp4_with_the_speech(files):
    root, models = files
    out = root / "out" / "talking.mp4"
    assert main(_generate_args(root, models, out)) == 0
    frames, fps, audio = read_video(out)
    speech = load_audio(root / "speech.wav")
    expected = math.ceil(speech.num_samples / 16000 * 25)
    assert frames.shape == (expected, TINY_SIZE, TINY_SIZE, 3)
    assert fps == pytest.approx(25)
    assert audio is not None and audio.duration == pytest.approx(expected / 25, abs=0.03)
    # the audio track is the input speech (AAC round trip: compare the waveforms by correlation)
    ours = audio.waveform.mean(0)[: speech.num_samples]
    if audio.sample_rate != 16000:
        import torchaudio
        ours = torchaudio.functional.resample(ours, audio.sample_rate, 16000)
    n = min(len(ours), speech.num_samples)
    corr = np.corrcoef(ours[:n].numpy(), speech.waveform[0, :n].numpy())[0, 1]
    assert corr > 0.9


def test_generate_reports_bad_inputs(files, capsys):
    root, models = files
    args = _generate_args(root, models, root / "x.mp4")
    bad_image = args.copy()
    bad_image[bad_image.index("--image") + 1] = str(root / "missing.png")
    assert main(bad_image) == 1
    assert "portrait" in capsys.readouterr().err
    assert main(_generate_args(root, models, root / "x.avi")) == 1
    assert "must end in .mp4" in capsys.readouterr().err
    assert main(_generate_args(root, root, root / "x.mp4")) == 1  # a folder without models
    assert "missing" in capsys.readouterr().err
    assert not (root / "x.mp4").exists()


@pytest.mark.parametrize("stop", ["cancel", "interrupt"])
def test_stopping_mid_run_leaves_no_output(files, stop):
    root, models = files
    loaded = EmoCASTModels.load(ModelPaths.resolve(models), device="cpu", dtype="fp32")
    speech = load_audio(root / "speech.wav")
    from emocast_core.cli.generate import load_image
    request = GenerationRequest(image=load_image(root / "portrait.jpg"), audio=speech, size=TINY_SIZE,
                                sampling=SamplingSettings(steps=2, clip_length=8))
    out = root / f"stopped_{stop}" / "talking.mp4"
    out.parent.mkdir()
    steps = []

    def progress(p):
        steps.append(p)
        if stop == "interrupt" and len(steps) == 3:
            raise KeyboardInterrupt

    cancel = (lambda: len(steps) >= 3) if stop == "cancel" else None
    with pytest.raises(GenerationCancelled if stop == "cancel" else KeyboardInterrupt):
        generate_video(loaded, request, out, progress=progress, cancel=cancel)
    assert len(steps) == 3
    assert list(out.parent.iterdir()) == []


def test_selftest_end_to_end(tmp_path):
    report = selftest(tmp_path, steps=1, show_progress=False)
    assert report.video == tmp_path / "selftest.mp4" and report.video.is_file()
    assert report.frames == report.expected_frames > 25
    assert report.audio_seconds == pytest.approx(report.frames / 25, abs=0.03)


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--models", "--image", "--audio", "--emotion", "--out", "--steps", "--cfg", "--seed", "--dtype",
                   "--device", "--pose-weight", "--face-weight", "--lip-weight", "--strength", "--crossfade"):
        assert option in text
    assert "EXPERIMENTAL" in text
