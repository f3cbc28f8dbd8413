"""Tiny synthetic insightface models with the real ONNX signatures (offline tests and ``selftest``).

insightface assigns each ``.onnx`` file its role from the graph signature, so these stand-ins load
through the real ``FaceAnalysis`` code:

* detector (``scrfd_10g_bnkps.onnx``): SCRFD layout, input ``(1, 3, S, S)`` and nine outputs (scores,
  box distances and 5-keypoint offsets at strides 8/16/32, two anchors per cell). It "finds" the faces
  given as ``SyntheticFace`` at fixed places of the detector canvas, scaled by the input's contrast:
  a uniform (blank) image yields no face.
* recognition (``glintr100.onnx``): ``(N, 3, 112, 112) -> (N, 512)``, a fixed random projection of the
  16x16-pooled aligned face, so the embedding depends on the image and is not unit-norm.
* landmarks (``2d106det.onnx``): ``(1, 3, 192, 192) -> (1, 212)``, a constant, plausible 106-point
  layout (insightface's grouping: contour 0-32, eyes 33-42 / 87-96, eyebrows 43-51 / 97-105,
  mouth 52-71, nose 72-86).

Nothing here depends on pytest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from .onnx_graphs import save_graph

DETECTOR_FILE = "scrfd_10g_bnkps.onnx"
RECOGNITION_FILE = "glintr100.onnx"
LANDMARK_FILE = "2d106det.onnx"

_STRIDES = (8, 16, 32)
_ANCHORS = 2
_FACE_STRIDE = 32  # faces are emitted at the coarsest level: one anchor per face
_CONTRAST_GAIN = 10.0  # input max-min (normalised units) at which the detector is fully confident


@dataclass(frozen=True)
class SyntheticFace:
    """A face the synthetic detector reports, in fractions of its square input canvas.

    insightface letterboxes the image into the canvas top-left aligned, so for a square image the
    fractions are fractions of the image; for a W x H image the canvas spans max(W, H) pixels.
    """

    center: tuple[float, float] = (0.5, 0.45)
    size: float = 0.35  # box side / canvas side
    score: float = 0.9


# Face layout in "box units": the detection box spans [-0.5, 0.5] on both axes, y pointing down.
_EYE = (0.2, -0.12)
_BROW_Y = -0.26
_MOUTH = (0.0, 0.28)
_NOSE_TIP = (0.0, 0.08)


def _ellipse(center: tuple[float, float], radii: tuple[float, float], count: int,
             start: float = 0.0) -> np.ndarray:
    angles = start + np.arange(count) * (2 * math.pi / count)
    return np.stack([center[0] + radii[0] * np.cos(angles), center[1] + radii[1] * np.sin(angles)], axis=1)


def _eye(side: float) -> np.ndarray:
    center = (side * _EYE[0], _EYE[1])
    return np.concatenate([_ellipse(center, (0.08, 0.035), 9), np.array([center])])


def _eyebrow(side: float) -> np.ndarray:
    xs = side * np.linspace(0.07, 0.33, 5)
    upper = np.stack([xs, _BROW_Y - 0.03 * np.sin(np.linspace(0.3, 2.8, 5))], axis=1)
    lower = np.stack([side * np.linspace(0.1, 0.3, 4), np.full(4, _BROW_Y + 0.03)], axis=1)
    return np.concatenate([upper, lower])


def landmarks_106_box_units() -> np.ndarray:
    """The synthetic 106-point layout (106, 2) relative to the detection box ([-0.5, 0.5] per axis)."""
    theta = np.deg2rad(np.arange(1, 17) * (100.0 / 16))[::-1]  # temple (index 1) down to the chin
    side_x, side_y = 0.46 * np.sin(theta), -0.1 + 0.6 * np.cos(theta)
    contour = np.concatenate([[[0.0, 0.5]], np.stack([-side_x, side_y], 1), np.stack([side_x, side_y], 1)])
    mouth = np.concatenate([_ellipse(_MOUTH, (0.17, 0.07), 12), _ellipse(_MOUTH, (0.11, 0.025), 8)])
    bridge = np.stack([np.zeros(5), np.linspace(-0.1, 0.06, 5)], axis=1)
    nose_base = _ellipse((0.0, 0.1), (0.09, 0.04), 10, start=0.0)
    points = np.concatenate([
        contour,                                  # 0-32
        _eye(-1.0),                               # 33-42
        _eyebrow(-1.0),                           # 43-51
        mouth,                                    # 52-71
        np.concatenate([bridge, nose_base]),      # 72-86
        _eye(1.0),                                # 87-96
        _eyebrow(1.0),                            # 97-105
    ])
    return points


def keypoints_5_box_units() -> np.ndarray:
    """The 5 detector keypoints (left eye, right eye, nose, left/right mouth corner) in box units."""
    return np.array([[-_EYE[0], _EYE[1]], [_EYE[0], _EYE[1]], list(_NOSE_TIP),
                     [_MOUTH[0] - 0.17, _MOUTH[1]], [_MOUTH[0] + 0.17, _MOUTH[1]]])


def _const(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.ascontiguousarray(array), name=name)


def _face_outputs(faces: Sequence[SyntheticFace], canvas: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores (N, 1), box distances (N, 4) and keypoint offsets (N, 10) at stride 32, in stride units."""
    cells = canvas // _FACE_STRIDE
    count = cells * cells * _ANCHORS
    scores = np.zeros((count, 1), np.float32)
    boxes = np.zeros((count, 4), np.float32)
    kps = np.zeros((count, 10), np.float32)
    used: set[int] = set()
    for face in faces:
        if not (0.0 < face.size <= 1.0 and 0.0 <= face.score <= 1.0):
            raise ValueError(f"face size must be in (0, 1] and score in [0, 1], got {face}")
        cx, cy = face.center[0] * canvas, face.center[1] * canvas
        col = int(np.clip(round(cx / _FACE_STRIDE), 0, cells - 1))
        row = int(np.clip(round(cy / _FACE_STRIDE), 0, cells - 1))
        index = (row * cells + col) * _ANCHORS
        if index in used:
            raise ValueError(f"two synthetic faces share the detector anchor at cell ({col}, {row}); move them apart")
        used.add(index)
        ax, ay = col * _FACE_STRIDE, row * _FACE_STRIDE
        half = face.size * canvas / 2
        scores[index] = face.score
        boxes[index] = np.array([ax - (cx - half), ay - (cy - half), cx + half - ax, cy + half - ay]) / _FACE_STRIDE
        points = np.array([cx, cy]) + keypoints_5_box_units() * face.size * canvas
        kps[index] = ((points - np.array([ax, ay])) / _FACE_STRIDE).reshape(-1)
    return scores, boxes, kps


def write_detector(path: str | Path, faces: Sequence[SyntheticFace] = (SyntheticFace(),),
                   det_size: int = 640) -> Path:
    """SCRFD-style detector (fixed ``det_size`` square input) reporting ``faces``."""
    if det_size < 64 or det_size % 32:
        raise ValueError(f"det_size must be a multiple of 32 and at least 64, got {det_size}")
    scores, boxes, kps = _face_outputs(faces, det_size)
    nodes, inits, outputs = [], [], []
    # gate = min(1, gain * (max - min)): a flat image (or the all-zero letterbox) has no face
    nodes += [
        helper.make_node("ReduceMax", ["input.1"], ["det_max"], name="det_max", keepdims=0),
        helper.make_node("ReduceMin", ["input.1"], ["det_min"], name="det_min", keepdims=0),
        helper.make_node("Sub", ["det_max", "det_min"], ["det_range"], name="det_range"),
        helper.make_node("Mul", ["det_range", "det_gain"], ["det_scaled"], name="det_scaled"),
        helper.make_node("Min", ["det_scaled", "det_one"], ["det_gate"], name="det_gate"),
    ]
    inits += [_const("det_gain", np.array(_CONTRAST_GAIN, np.float32)), _const("det_one", np.array(1.0, np.float32))]
    groups = {"score": 1, "bbox": 4, "kps": 10}
    for group, width in groups.items():
        for stride in _STRIDES:
            count = (det_size // stride) ** 2 * _ANCHORS
            name = f"{group}_{stride}"
            outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [count, width]))
            if stride != _FACE_STRIDE:
                inits.append(_const(f"{name}_shape", np.array([count, width], np.int64)))
                nodes.append(helper.make_node("ConstantOfShape", [f"{name}_shape"], [name], name=name,
                                              value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0])))
            elif group == "score":
                inits.append(_const(f"{name}_const", scores))
                nodes.append(helper.make_node("Mul", [f"{name}_const", "det_gate"], [name], name=name))
            else:
                inits.append(_const(f"{name}_const", boxes if group == "bbox" else kps))
                nodes.append(helper.make_node("Identity", [f"{name}_const"], [name], name=name))
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, det_size, det_size])
    return save_graph(helper.make_graph(nodes, "synthetic_scrfd", [image], outputs, inits), Path(path))


def write_recognizer(path: str | Path, seed: int = 0) -> Path:
    """ArcFace-style recognition model: (N, 3, 112, 112) -> (N, 512), unnormalised."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3 * 7 * 7, 512)).astype(np.float32)
    bias = rng.standard_normal(512).astype(np.float32)
    # Node names must not start with "Sub"/"Mul": insightface would then pick the MXNet normalisation.
    nodes = [
        helper.make_node("AveragePool", ["input.1"], ["rec_pooled"], name="rec_pool",
                         kernel_shape=[16, 16], strides=[16, 16]),
        helper.make_node("Flatten", ["rec_pooled"], ["rec_flat"], name="rec_flatten", axis=1),
        helper.make_node("Gemm", ["rec_flat", "rec_weight", "rec_bias"], ["embedding"], name="rec_fc"),
    ]
    image = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["N", 3, 112, 112])
    embedding = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["N", 512])
    graph = helper.make_graph(nodes, "synthetic_arcface", [image], [embedding],
                              [_const("rec_weight", weight), _const("rec_bias", bias)])
    return save_graph(graph, Path(path))


def write_landmarker(path: str | Path) -> Path:
    """2d106det-style landmark model: (1, 3, 192, 192) -> (1, 212), a constant face layout.

    insightface crops a square of 1.5 x the box side around the box centre and maps outputs from
    [-1, 1], so box units scale by 1 / 0.75.
    """
    layout = (landmarks_106_box_units() / 0.75).astype(np.float32).reshape(1, 212)
    nodes = [
        # consume the input so the graph is a function of it, then add the fixed layout
        helper.make_node("ReduceMean", ["data"], ["lmk_mean"], name="lmk_mean", keepdims=0),
        helper.make_node("Mul", ["lmk_mean", "lmk_zero"], ["lmk_offset"], name="lmk_offset"),
        helper.make_node("Add", ["lmk_layout", "lmk_offset"], ["fc1"], name="lmk_out"),
    ]
    image = helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 192, 192])
    out = helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [1, 212])
    graph = helper.make_graph(nodes, "synthetic_2d106", [image], [out],
                              [_const("lmk_layout", layout), _const("lmk_zero", np.array(0.0, np.float32))])
    return save_graph(graph, Path(path))


def write_face_models(folder: str | Path, faces: Sequence[SyntheticFace] = (SyntheticFace(),),
                      det_size: int = 640, seed: int = 0) -> Path:
    """Write the three synthetic models into ``folder`` (created if needed) and return it."""
    folder = Path(folder)
    write_detector(folder / DETECTOR_FILE, faces, det_size)
    write_recognizer(folder / RECOGNITION_FILE, seed)
    write_landmarker(folder / LANDMARK_FILE)
    return folder
