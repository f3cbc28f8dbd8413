"""Loading the models and preparing a face log nothing but what EmoCAST says: no warning from diffusers about
a missing `accelerate`, none from insightface's use of a deprecated scikit-image call."""
from __future__ import annotations

import logging
import warnings

import diffusers.models.modeling_utils
import pytest
from skimage import data as skdata

from emocast_core import runtime
from emocast_core.model_paths import ModelPaths
from emocast_core.preprocess.face import prepare_face
from emocast_core.runtime import EmoCASTModels
from emocast_core.testing.tiny_models import TINY_SIZE, write_tiny_models

THIRD_PARTY_LOGGERS = ("diffusers", "transformers")  # their own handlers, and no propagation to the root


@pytest.fixture
def library_logs(caplog):
    """caplog, also for diffusers' and transformers' loggers (which do not propagate to the root)."""
    loggers = [logging.getLogger(name) for name in THIRD_PARTY_LOGGERS]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.WARNING)
    yield caplog
    for logger in loggers:
        logger.removeHandler(caplog.handler)


@pytest.mark.parametrize("accelerate", [True, False], ids=["with_accelerate", "without_accelerate"])
def test_loading_and_face_preparation_are_quiet(tmp_path, monkeypatch, library_logs, accelerate):
    if not accelerate:  # as in a ComfyUI environment without accelerate (it is only in the train extra)
        monkeypatch.setattr(diffusers.models.modeling_utils, "is_accelerate_available", lambda: False)
        monkeypatch.setattr(runtime, "is_accelerate_available", lambda: False)
    root = write_tiny_models(tmp_path / "models")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        models = EmoCASTModels.load(ModelPaths.resolve(root), device="cpu", dtype="fp32")
        prepared = prepare_face(skdata.astronaut(), models.face_analyzer, size=TINY_SIZE)
    assert prepared.identity.shape == (512,)
    assert [f"{w.category.__name__}: {w.message}" for w in caught
            if "estimate" in str(w.message) or issubclass(w.category, FutureWarning)] == []
    assert [r.getMessage() for r in library_logs.records if "accelerate" in r.getMessage()] == []


def test_only_that_warning_is_silenced(tmp_path):
    """The filter around insightface is narrow: another FutureWarning raised inside the call still shows."""
    from emocast_core.preprocess import face as face_module

    class NoisyApp:
        def get(self, image):
            warnings.warn("`estimate` is deprecated since version 0.26", FutureWarning)
            warnings.warn("something else changes", FutureWarning)
            return []

    analyzer = face_module.FaceAnalyzer(app=NoisyApp(), model_dir=tmp_path, mediapipe=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert analyzer.detect(skdata.astronaut()) == []
    assert [str(w.message) for w in caught] == ["something else changes"]
