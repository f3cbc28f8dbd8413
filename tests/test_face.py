"""Face conditioning through the real insightface loading code, on synthetic ONNX models."""
from __future__ import annotations

import importlib.util
import logging
import shutil

import cv2
import numpy as np
import onnxruntime
import pytest
import torch
from skimage import data as skdata

from emocast_core.preprocess.face import (
    CONTOUR_106,
    FaceAnalyzer,
    face_points_106,
    prepare_face,
    square_crop_box,
)
from emocast_core.preprocess.face_masks import expand_rect, rect_mask
from emocast_core.testing.face_models import (
    DETECTOR_FILE,
    LANDMARK_FILE,
    RECOGNITION_FILE,
    SyntheticFace,
    landmarks_106_box_units,
    write_detector,
    write_face_models,
    write_landmarker,
    write_recognizer,
)

# insightface's alignment helper uses a scikit-image API that warns on recent versions
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # the reference embedding calls insightface directly

# where the astronaut's face is in skimage's 512x512 photo, as fractions of the image
ASTRONAUT_FACE = SyntheticFace(center=(0.44, 0.22), size=0.2)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_face_models(tmp_path_factory.mktemp("face_models"), faces=[ASTRONAUT_FACE])


@pytest.fixture(scope="module")
def analyzer(models) -> FaceAnalyzer:
    return FaceAnalyzer.from_folder(models)


def _arcface_embedding(models, image_rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
    """Recognition output computed independently: ArcFace alignment, (x - 127.5) / 127.5, raw ONNX run."""
    from insightface.utils import face_align

    aligned = face_align.norm_crop(np.ascontiguousarray(image_rgb[..., ::-1]), landmark=kps, image_size=112)
    blob = ((aligned[..., ::-1].astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
    session = onnxruntime.InferenceSession(str(models / RECOGNITION_FILE), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: np.ascontiguousarray(blob)})[0][0]


def test_loader_assigns_roles_by_signature(analyzer, models):
    assert {task: m.model_file.split("/")[-1] for task, m in analyzer.app.models.items()} == {
        "detection": DETECTOR_FILE, "recognition": RECOGNITION_FILE, "landmark_2d_106": LANDMARK_FILE}
    assert analyzer.app.models["recognition"].input_mean == 127.5  # glintr100's normalisation
    assert analyzer.mediapipe is None  # the 106-point landmarks of insightface are used


def test_official_mode_on_square_photo(analyzer, models, astronaut):
    cond = prepare_face(astronaut, analyzer, size=512, crop=False)
    # 512 -> 512 resize is the identity: the reference is the photo mapped to [-1, 1]
    assert cond.reference.shape == (3, 512, 512)
    expected = torch.from_numpy(astronaut).permute(2, 0, 1).float().div(255).sub(0.5).div(0.5)
    assert torch.equal(cond.reference, expected)
    assert cond.crop_box == (0, 0, 512, 512)

    x1, y1, x2, y2 = cond.detection_box
    np.testing.assert_allclose([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1],
                               [0.44 * 512, 0.22 * 512, 0.2 * 512, 0.2 * 512], atol=1e-3)

    face = analyzer.detect(astronaut)[0]
    assert cond.identity.shape == (512,) and cond.identity.dtype == torch.float32
    expected_identity = _arcface_embedding(models, astronaut, face.kps)
    np.testing.assert_allclose(cond.identity.numpy(), expected_identity, rtol=1e-4, atol=1e-3)
    assert abs(float(cond.identity.norm()) - 1.0) > 1.0  # unnormalised

    # FaceLocator input: the face box, exactly (no resize at 512)
    assert cond.face_region.shape == (3, 512, 512)
    assert torch.equal(cond.face_region[1], torch.from_numpy(rect_mask(cond.face_rect, 512, 512)).float() / 255)

    fx0, fy0, fx1, fy1 = cond.face_rect
    lx0, ly0, lx1, ly1 = cond.lip_rect
    assert fx0 <= x1 and x2 <= fx1  # the face box spans the detection box horizontally
    assert fx0 <= lx0 and lx1 <= fx1 and fy0 <= ly0 and ly1 <= fy1  # lips inside the face box
    # the forehead extension lifts the top above the 106-point contour's own box
    contour_top = expand_rect(face.landmark_2d_106[list(CONTOUR_106)], 1.2, 512, 512)[1]
    assert fy0 < contour_top and fy0 < y1
    # the synthetic mouth centre (box units (0, 0.28)) is inside the lip box
    mouth = np.array([(x1 + x2) / 2, (y1 + y2) / 2 + 0.28 * (y2 - y1)])
    assert lx0 <= mouth[0] < lx1 and ly0 <= mouth[1] < ly1

    assert [round(level.numel() ** 0.5) for level in cond.masks.pose] == [64, 32, 16, 8]
    for levels in (cond.masks.pose, cond.masks.face, cond.masks.lip):
        assert [level.shape for level in levels] == [(4096,), (1024,), (256,), (64,)]
        assert all(0.0 <= float(lv.min()) and float(lv.max()) <= 1.0 for lv in levels)
    # the lip mask peaks inside the lip box (64x64 map = 1/8 of the image)
    row, col = divmod(int(cond.masks.lip[0].argmax()), 64)
    assert lx0 // 8 <= col <= lx1 // 8 and ly0 // 8 <= row <= ly1 // 8


def test_crop_mode_centres_the_face(analyzer, astronaut):
    cond = prepare_face(astronaut, analyzer, size=256)
    x0, y0, x1, y1 = cond.crop_box
    assert x1 - x0 == y1 - y0 and 0 <= x0 and 0 <= y0 and x1 <= 512 and y1 <= 512
    bx1, by1, bx2, by2 = cond.detection_box
    assert x0 <= bx1 and y0 <= by1 and bx2 <= x1 and by2 <= y1
    assert cond.reference.shape == (3, 256, 256) and cond.face_region.shape == (3, 256, 256)
    assert [round(level.numel() ** 0.5) for level in cond.masks.pose] == [32, 16, 8, 4]
    fx0, fy0, fx1, fy1 = cond.face_rect
    assert abs((fx0 + fx1) / 2 - 128) < 20
    # the reference is the crop, resized
    crop = astronaut[y0:y1, x0:x1]
    small = cv2.resize(crop, (256, 256), interpolation=cv2.INTER_AREA).astype(np.float32) / 127.5 - 1
    assert np.abs(cond.reference.permute(1, 2, 0).numpy() - small).mean() < 0.02
    # same face, same identity as without the crop
    official = prepare_face(astronaut, analyzer, size=256, crop=False)
    assert torch.equal(cond.identity, official.identity)


@pytest.mark.parametrize("width, height", [(384, 256), (256, 384)])
def test_non_square_photo(analyzer, astronaut, width, height):
    image = cv2.resize(astronaut, (width, height), interpolation=cv2.INTER_AREA)
    cond = prepare_face(image, analyzer, size=128)
    x0, y0, x1, y1 = cond.crop_box
    assert x1 - x0 == y1 - y0 <= min(width, height)
    assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
    bx1, by1, bx2, by2 = cond.detection_box
    assert x0 <= bx1 and y0 <= by1 and bx2 <= x1 and by2 <= y1
    assert cond.reference.shape == (3, 128, 128) and [round(level.numel() ** 0.5) for level in cond.masks.pose] == [16, 8, 4, 2]
    assert cond.identity.shape == (512,)
    official = prepare_face(image, analyzer, size=128, crop=False)
    assert official.crop_box == (0, 0, width, height)
    assert official.face_region.shape == (3, 128, 128)


def test_face_larger_than_the_image_is_padded(tmp_path, astronaut, caplog):
    # a 512x256 image whose face box (0.8 of the 512 canvas side) is taller than the image
    folder = write_face_models(tmp_path, faces=[SyntheticFace(center=(0.5, 0.25), size=0.8)])
    image = cv2.resize(astronaut, (512, 256), interpolation=cv2.INTER_AREA)
    with caplog.at_level(logging.WARNING):
        cond = prepare_face(image, FaceAnalyzer.from_folder(folder), size=128)
    x0, y0, x1, y1 = cond.crop_box
    assert x1 - x0 == y1 - y0 > 256 and y0 < 0 < 256 < y1
    assert "padding" in caplog.text
    assert cond.reference.shape == (3, 128, 128)


def test_largest_face_wins_with_a_warning(tmp_path, astronaut, caplog):
    faces = [SyntheticFace(center=(0.25, 0.3), size=0.1), SyntheticFace(center=(0.7, 0.6), size=0.3)]
    analyzer = FaceAnalyzer.from_folder(write_face_models(tmp_path, faces=faces))
    with caplog.at_level(logging.WARNING):
        cond = prepare_face(astronaut, analyzer, size=128, crop=False)
    assert "found 2 faces" in caplog.text
    x1, y1, x2, y2 = cond.detection_box
    np.testing.assert_allclose([(x1 + x2) / 2, x2 - x1], [0.7 * 512, 0.3 * 512], atol=1e-3)


def test_models_in_a_models_subfolder(tmp_path, models):
    shutil.copytree(models, tmp_path / "face_analysis" / "models")
    assert FaceAnalyzer.from_folder(tmp_path / "face_analysis").model_dir.name == "models"


def test_missing_models_are_listed(tmp_path):
    only_detector = tmp_path / "det"
    write_detector(only_detector / DETECTOR_FILE)
    with pytest.raises(FileNotFoundError) as info:
        FaceAnalyzer.from_folder(only_detector)
    message = str(info.value)
    assert "recognition" in message and "glintr100.onnx" in message
    assert "landmark_2d_106" in message and "2d106det.onnx" in message
    assert f"{DETECTOR_FILE} -> detection" in message

    no_detector = tmp_path / "nodet"
    write_recognizer(no_detector / "rec.onnx")
    write_landmarker(no_detector / "lmk.onnx")
    with pytest.raises(FileNotFoundError) as info:
        FaceAnalyzer.from_folder(no_detector)
    message = str(info.value)
    assert "detection" in message and "scrfd_10g_bnkps.onnx" in message
    assert "rec.onnx -> recognition" in message and "lmk.onnx -> landmark_2d_106" in message

    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no .onnx models"):
        FaceAnalyzer.from_folder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not found"):
        FaceAnalyzer.from_folder(tmp_path / "nowhere")


def test_no_face_is_an_error(tmp_path, analyzer, astronaut):
    blank = np.full((256, 256, 3), 128, np.uint8)  # no contrast: the synthetic detector sees nothing
    with pytest.raises(ValueError, match="No face was found.*frontal, well-lit portrait"):
        prepare_face(blank, analyzer)
    weak = FaceAnalyzer.from_folder(write_face_models(tmp_path, faces=[SyntheticFace(score=0.3)]))
    with pytest.raises(ValueError, match="No face was found"):
        prepare_face(astronaut, weak)


def test_bad_images_are_rejected(analyzer, astronaut):
    with pytest.raises(ValueError, match="uint8"):
        prepare_face(astronaut.astype(np.float32) / 255, analyzer)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        prepare_face(astronaut[..., 0], analyzer)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        prepare_face(np.dstack([astronaut, astronaut[..., :1]]), analyzer)
    with pytest.raises(ValueError, match="at least 64"):
        prepare_face(astronaut[:40, :300], analyzer)
    with pytest.raises(TypeError, match="numpy array"):
        prepare_face(astronaut[:80, :80].tolist(), analyzer)
    with pytest.raises(ValueError, match="multiple of 64"):
        prepare_face(astronaut, analyzer, size=500)


def test_forehead_points_and_crop_box_geometry():
    # the synthetic layout of a 100-pixel box at (50, 50): forehead points rise above the eyebrows
    lmk = landmarks_106_box_units() * 100 + 50
    points = face_points_106(lmk)
    assert points.shape == (33 + 18 + 18, 2)
    assert points[:, 1].min() < lmk[list(range(43, 52)) + list(range(97, 106)), 1].min() - 10
    # 2x crop of a 100-pixel face at the left edge of a 1000x500 image: shifted inside
    assert square_crop_box((0, 200, 100, 300), 1000, 500, 2.0) == (0, 150, 200, 350)
    with pytest.raises(ValueError, match="at least 1"):
        square_crop_box((0, 0, 10, 10), 100, 100, 0.5)


@pytest.mark.skipif(importlib.util.find_spec("mediapipe") is not None, reason="mediapipe is installed")
def test_mediapipe_landmarks_need_mediapipe(models, tmp_path):
    (tmp_path / "face_landmarker.task").write_bytes(b"")
    with pytest.raises(ImportError, match="pip install mediapipe"):
        FaceAnalyzer.from_folder(models, landmarks="mediapipe", landmarker_task=tmp_path / "face_landmarker.task")
