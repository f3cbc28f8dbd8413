"""Face conditioning of EmoCAST: portrait -> reference image, identity embedding, face box, attention masks.

Detection and identity follow the official preprocessing (docs/model.md §4.1–4.2): insightface's
SCRFD detector and ArcFace recognition (512-d, unnormalised ``embedding``), largest box wins.

The face and lip rectangles come from insightface's 106-point landmark model (``2d106det.onnx``)
instead of the official MediaPipe FaceLandmarker, so that one model family covers everything:

* insightface's 106 points are ordered by point name (see the markup in insightface's
  ``alignment/coordinate_reg`` README), which groups them as contour 0-32, one eye 33-42, one eyebrow
  43-51, mouth 52-71, nose 72-86, other eye 87-96, other eyebrow 97-105. The mouth group (outer and
  inner lip contours) has the same bounding box as the official 20 outer-lip MediaPipe points.
* The official face silhouette reaches up the forehead (MediaPipe point 10), but the 106-point contour
  stops at the temples. We add the eyebrows and a copy of them moved up by ``FOREHEAD_FRACTION`` of
  the chin-to-eyebrow vector. The value 0.225 comes from MediaPipe's canonical face model: point 10
  lies 3.15 units above the highest brow point (105), and the brow centroid lies 13.97 units above
  the chin (152); 3.15 / 13.97 = 0.225.

With ``FaceAnalyzer.from_folder(..., landmarks="mediapipe")`` the official MediaPipe landmarks and
index lists are used instead (optional: needs the ``mediapipe`` package and a FaceLandmarker ``.task``).
"""
from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import cv2
import numpy as np
import torch
from PIL import Image

from .face_masks import Rect, RegionMasks, build_region_masks, expand_rect, face_region_image

logger = logging.getLogger(__name__)

DETECTION, RECOGNITION, LANDMARK_106 = "detection", "recognition", "landmark_2d_106"
EXPECTED_FILES = {
    DETECTION: "scrfd_10g_bnkps.onnx (official; buffalo_l's det_10g.onnx also works)",
    RECOGNITION: "glintr100.onnx (official; buffalo_l's w600k_r50.onnx also works)",
    LANDMARK_106: "2d106det.onnx",
}

CONTOUR_106 = tuple(range(0, 33))
EYEBROWS_106 = tuple(range(43, 52)) + tuple(range(97, 106))
LIPS_106 = tuple(range(52, 72))
FOREHEAD_FRACTION = 0.225

# Official MediaPipe face-mesh indices (docs/model.md Appendix A.2).
MEDIAPIPE_SILHOUETTE = (
    10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
    176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
MEDIAPIPE_LIPS = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291, 146, 91, 181, 84, 17, 314, 405, 321, 375)

MIN_IMAGE_SIDE = 64
NO_FACE_MESSAGE = (
    "No face was found in the portrait. Use a frontal, well-lit portrait in which the face is clearly "
    "visible and not too small (at least about 1/10 of the image height).")


def face_points_106(landmarks: np.ndarray) -> np.ndarray:
    """Points whose bounding box plays the official silhouette's role: contour, brows, forehead."""
    lmk = _check_landmarks(landmarks, 106)
    contour, brows = lmk[list(CONTOUR_106)], lmk[list(EYEBROWS_106)]
    brow_centre = brows.mean(axis=0)
    # the chin is the contour point farthest from the brows; "up" is chin -> brows, robust to head roll
    chin = contour[np.argmax(np.linalg.norm(contour - brow_centre, axis=1))]
    forehead = brows + FOREHEAD_FRACTION * (brow_centre - chin)
    return np.concatenate([contour, brows, forehead])


def lip_points_106(landmarks: np.ndarray) -> np.ndarray:
    """The 20 mouth points of insightface's 106-point layout."""
    return _check_landmarks(landmarks, 106)[list(LIPS_106)]


def _check_landmarks(landmarks: np.ndarray, count: int) -> np.ndarray:
    lmk = np.asarray(landmarks, dtype=np.float64)
    if lmk.ndim != 2 or lmk.shape[0] < count or lmk.shape[1] < 2:
        raise ValueError(f"expected at least {count} landmarks of (x, y), got shape {lmk.shape}")
    return lmk[:, :2]


def square_crop_box(bbox: Sequence[float], width: int, height: int, scale: float = 2.0) -> Rect:
    """Square ``(x0, y0, x1, y1)`` of side ``scale`` x the face box, centred on it, kept inside the image.

    The square shrinks to the image's shorter side when it would not fit, but never below the face box;
    only then does it reach outside the image (the caller pads).
    """
    if not scale >= 1.0:
        raise ValueError(f"crop scale must be at least 1 (the crop contains the face box), got {scale}")
    x1, y1, x2, y2 = (float(v) for v in bbox[:4])
    face_side = max(x2 - x1, y2 - y1)
    if not face_side > 0:
        raise ValueError(f"face box {tuple(bbox[:4])} is empty")
    side = max(1, int(round(face_side * scale)))
    if side > min(width, height):
        side = max(min(width, height), int(math.ceil(face_side)))
    x0 = _place(0.5 * (x1 + x2), side, width)
    y0 = _place(0.5 * (y1 + y2), side, height)
    return x0, y0, x0 + side, y0 + side


def _place(centre: float, side: int, limit: int) -> int:
    start = int(round(centre - side / 2))
    if side <= limit:
        start = min(max(start, 0), limit - side)
    return start


def crop_image(image: np.ndarray, box: Rect) -> np.ndarray:
    """``image[y0:y1, x0:x1]``; parts outside the image repeat its border pixels."""
    x0, y0, x1, y1 = box
    height, width = image.shape[:2]
    top, bottom = max(0, -y0), max(0, y1 - height)
    left, right = max(0, -x0), max(0, x1 - width)
    if top or bottom or left or right:
        logger.warning("the face is too large for a square crop inside the image; padding the crop by "
                       "repeating the border (top %d, bottom %d, left %d, right %d px)", top, bottom, left, right)
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_REPLICATE)
    return np.ascontiguousarray(image[y0 + top:y1 + top, x0 + left:x1 + left])


def _find_model_dir(folder: Path) -> Path:
    if not folder.is_dir():
        raise FileNotFoundError(f"face-analysis model folder not found: {folder}")
    # the official layout is <face_analysis>/models/*.onnx; accept the models folder itself as well
    for candidate in (folder, folder / "models"):
        if candidate.is_dir() and any(candidate.glob("*.onnx")):
            return candidate
    wanted = "; ".join(f"{role}: {name}" for role, name in EXPECTED_FILES.items())
    raise FileNotFoundError(
        f"no .onnx models in {folder} or {folder / 'models'}; expected insightface models ({wanted})")


def _roles_by_file(model_dir: Path, providers: Sequence[str]) -> dict[str, str]:
    """Role insightface assigns to each file (its own graph-signature routing); slow, error path only."""
    from insightface.model_zoo import model_zoo

    roles = {}
    for path in sorted(model_dir.glob("*.onnx")):
        model = model_zoo.get_model(str(path), providers=list(providers))
        roles[path.name] = model.taskname if model is not None else "not recognised"
    return roles


def _unreadable_model_error(model_dir: Path, providers: Sequence[str], exc: Exception) -> ValueError:
    """Name the .onnx file ONNX Runtime cannot load (truncated, corrupt, not ONNX at all)."""
    import onnxruntime

    for path in sorted(model_dir.glob("*.onnx")):
        try:
            onnxruntime.InferenceSession(str(path), providers=list(providers))
        except Exception as file_exc:  # ONNX Runtime's own exception types derive from Exception only
            return ValueError(f"the face-analysis model {path} cannot be loaded ({file_exc}); it is truncated or "
                              "not an ONNX model: download it again from the insightface model zoo")
    return ValueError(f"the face-analysis models in {model_dir} cannot be loaded: {exc}")


def _missing_roles_error(model_dir: Path, missing: Sequence[str], found: dict[str, str]) -> FileNotFoundError:
    wanted = "; ".join(f"{role} (expected e.g. {EXPECTED_FILES[role]})" for role in missing)
    seen = ", ".join(f"{name} -> {role}" for name, role in sorted(found.items())) or "none"
    return FileNotFoundError(
        f"the face-analysis folder {model_dir} lacks the model(s) for: {wanted}. Files found and their "
        f"roles: {seen}. insightface assigns roles from each model's inputs/outputs, so any file name works.")


@dataclass
class MediaPipeLandmarker:
    """The official landmark source: MediaPipe FaceLandmarker, IMAGE mode, default options (optional)."""

    task_path: Path
    landmarker: Any

    @classmethod
    def from_task(cls, task_path: str | Path) -> MediaPipeLandmarker:
        try:
            import mediapipe as mp
        except ImportError as error:
            raise ImportError("landmarks='mediapipe' needs the optional mediapipe package "
                              "(pip install mediapipe); or use the default landmarks='insightface'") from error
        task_path = Path(task_path)
        if not task_path.is_file():
            raise FileNotFoundError(f"MediaPipe FaceLandmarker task file not found: {task_path} "
                                    "(the official one is face_landmarker_v2_with_blendshapes.task)")
        options = mp.tasks.vision.FaceLandmarkerOptions(
            base_options=mp.tasks.BaseOptions(model_asset_path=str(task_path)),
            running_mode=mp.tasks.vision.RunningMode.IMAGE)
        return cls(task_path, mp.tasks.vision.FaceLandmarker.create_from_options(options))

    def __call__(self, image_rgb: np.ndarray) -> np.ndarray:
        """Pixel landmarks (478, 2) of the single face in an RGB uint8 image."""
        import mediapipe as mp

        height, width = image_rgb.shape[:2]
        result = self.landmarker.detect(mp.Image(image_format=mp.ImageFormat.SRGB,
                                                 data=np.ascontiguousarray(image_rgb)))
        if not result.face_landmarks:
            raise ValueError(f"MediaPipe FaceLandmarker found no face. {NO_FACE_MESSAGE}")
        if len(result.face_landmarks) > 1:
            raise ValueError(f"MediaPipe FaceLandmarker found {len(result.face_landmarks)} faces, expected one; "
                             "crop the portrait to a single person")
        return np.array([[p.x * width, p.y * height] for p in result.face_landmarks[0]], dtype=np.float64)


def _find_task(folder: Path, model_dir: Path) -> Path:
    for candidate in (folder, model_dir):
        tasks = sorted(candidate.glob("face_landmarker*.task")) or sorted(candidate.glob("*.task"))
        if tasks:
            return tasks[0]
    raise FileNotFoundError(f"no MediaPipe FaceLandmarker .task file in {folder} or {model_dir} "
                            "(the official one is face_landmarker_v2_with_blendshapes.task)")


@dataclass
class FaceAnalyzer:
    """insightface ``FaceAnalysis`` loaded from a local folder, plus the landmark source for the masks."""

    app: Any  # insightface.app.FaceAnalysis
    model_dir: Path
    mediapipe: MediaPipeLandmarker | None = None

    @classmethod
    def from_folder(cls, folder: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",),
                    det_size: tuple[int, int] = (640, 640), *, det_thresh: float = 0.5,
                    landmarks: Literal["insightface", "mediapipe"] = "insightface",
                    landmarker_task: str | Path | None = None) -> FaceAnalyzer:
        """Load the detector, recognition and (by default) 106-point landmark models from ``folder``.

        ``folder`` holds the ``.onnx`` files directly or in a ``models/`` subfolder (the official
        ``face_analysis/models`` layout). Nothing is downloaded.
        """
        if landmarks not in ("insightface", "mediapipe"):
            raise ValueError(f"landmarks must be 'insightface' or 'mediapipe', got {landmarks!r}")
        folder = Path(folder).expanduser()
        model_dir = _find_model_dir(folder)
        mediapipe = None
        if landmarks == "mediapipe":
            task = Path(landmarker_task) if landmarker_task is not None else _find_task(folder, model_dir)
            mediapipe = MediaPipeLandmarker.from_task(task)
        roles = [DETECTION, RECOGNITION] + ([LANDMARK_106] if mediapipe is None else [])
        app = _load_face_analysis(model_dir, providers, roles)
        app.prepare(ctx_id=0, det_thresh=det_thresh, det_size=tuple(det_size))
        return cls(app=app, model_dir=model_dir, mediapipe=mediapipe)

    def detect(self, image_rgb: np.ndarray) -> list[Any]:
        """insightface faces of an RGB uint8 image, largest box area first."""
        # insightface's face alignment calls scikit-image's deprecated `SimilarityTransform.estimate`, a
        # FutureWarning on every face with scikit-image >= 0.26. It is insightface's to fix and changes nothing
        # here, so exactly that warning is silenced, for this call only.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)
            faces = self.app.get(np.ascontiguousarray(image_rgb[..., ::-1]))  # insightface expects BGR
        return sorted(faces, key=_box_area, reverse=True)

    def region_rects(self, face: Any, work_image: np.ndarray, offset: tuple[int, int],
                     face_expand_ratio: float, lip_expand_ratio: float) -> tuple[Rect, Rect]:
        """Face and lip rectangles in ``work_image`` (the original image shifted by ``offset``)."""
        height, width = work_image.shape[:2]
        if self.mediapipe is not None:
            points = self.mediapipe(work_image)
            face_pts, lip_pts = points[list(MEDIAPIPE_SILHOUETTE)], points[list(MEDIAPIPE_LIPS)]
        else:
            lmk = face.get("landmark_2d_106")
            if lmk is None:
                raise RuntimeError("the 106-point landmark model produced no landmarks for the detected face")
            lmk = np.asarray(lmk, dtype=np.float64) - np.asarray(offset, dtype=np.float64)
            face_pts, lip_pts = face_points_106(lmk), lip_points_106(lmk)
        return (expand_rect(face_pts, face_expand_ratio, width, height),
                expand_rect(lip_pts, lip_expand_ratio, width, height))


def _load_face_analysis(model_dir: Path, providers: Sequence[str], roles: Sequence[str]) -> Any:
    from insightface.app import FaceAnalysis

    # An absolute directory as ``name`` is used as is by insightface >= 2.1 and, through os.path.join,
    # by 0.7.x as well; ``root`` points there too so nothing ever resolves to ~/.insightface.
    try:
        app = FaceAnalysis(name=str(model_dir.resolve()), root=str(model_dir.resolve()),
                           providers=list(providers), allowed_modules=list(roles))
    except AssertionError:  # FaceAnalysis asserts that a detector was found
        found = _roles_by_file(model_dir, providers)
        if DETECTION in found.values():
            raise
        raise _missing_roles_error(model_dir, [r for r in roles if r not in found.values()], found) from None
    except Exception as exc:
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        raise _unreadable_model_error(model_dir, providers, exc) from exc
    missing = [role for role in roles if role not in app.models]
    if missing:
        found = {Path(m.model_file).name: task for task, m in app.models.items()}
        raise _missing_roles_error(model_dir, missing, found)
    return app


def _box_area(face: Any) -> float:
    x1, y1, x2, y2 = (float(v) for v in face.bbox[:4])
    return (x2 - x1) * (y2 - y1)


@dataclass
class PreparedFace:
    """Everything the portrait contributes to the EmoCAST networks.

    ``reference`` (3, size, size) in [-1, 1]; ``identity`` (512,) float32 unnormalised ArcFace
    embedding; ``face_region`` (3, size, size) in [0, 1] (FaceLocator input); ``masks`` the attention
    masks; ``crop_box`` the square taken from the original image (may extend past its border, which
    is then padded); ``face_rect`` / ``lip_rect`` in output-image pixels (end-exclusive);
    ``detection_box`` the chosen detector box in the original image.
    """

    reference: torch.Tensor
    identity: torch.Tensor
    face_region: torch.Tensor
    masks: RegionMasks
    crop_box: Rect
    face_rect: Rect
    lip_rect: Rect
    detection_box: tuple[float, float, float, float]


def validate_portrait(image: np.ndarray) -> None:
    """The portrait array is usable (RGB uint8, big enough); checked before any model runs."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"the portrait must be a numpy array (H, W, 3) RGB uint8, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"the portrait must be uint8 RGB in 0..255, got dtype {image.dtype}; convert a [0, 1] "
                         "float image with (image * 255).round().astype(np.uint8)")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"the portrait must have shape (H, W, 3) RGB, got {image.shape}; convert grayscale "
                         "or RGBA images to RGB first")
    if min(image.shape[:2]) < MIN_IMAGE_SIDE:
        raise ValueError(f"the portrait is {image.shape[1]}x{image.shape[0]} pixels; both sides must be at "
                         f"least {MIN_IMAGE_SIDE} (512 or more is recommended)")


def _scale_rect(rect: Rect, width: int, height: int, size: int) -> Rect:
    sx, sy = size / width, size / height
    x0, y0, x1, y1 = rect
    return round(x0 * sx), round(y0 * sy), round(x1 * sx), round(y1 * sy)


def _reference_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.array(resized, dtype=np.uint8)).permute(2, 0, 1).float().div(255)
    return pixels.sub(0.5).div(0.5)  # the official Normalize([0.5], [0.5])


def prepare_face(image: np.ndarray, analyzer: FaceAnalyzer, size: int = 512, crop: bool = True,
                 face_expand_ratio: float = 1.2, lip_expand_ratio: float = 2.0,
                 crop_scale: float = 2.0) -> PreparedFace:
    """Portrait (H, W, 3) RGB uint8 -> EmoCAST face conditioning at ``size`` x ``size``.

    ``crop=True`` takes a square of ``crop_scale`` x the largest face box around it (so any aspect
    ratio works) and treats that crop as the portrait. ``crop=False`` is the official behaviour: the
    whole image is resized to a square without cropping (meant for square, face-centred portraits).
    Rectangles and masks are computed at the portrait's own resolution, as the official code does.
    """
    validate_portrait(image)
    if not isinstance(size, (int, np.integer)) or size < 64 or size % 64:
        raise ValueError(f"size must be a positive multiple of 64 (latent = size / 8, halved three times "
                         f"by the UNet), got {size!r}")
    faces = analyzer.detect(image)
    if not faces:
        raise ValueError(NO_FACE_MESSAGE)
    face = faces[0]
    if len(faces) > 1:
        logger.warning("found %d faces in the portrait; using the largest (box %s)",
                       len(faces), np.round(face.bbox[:4], 1).tolist())
    if face.embedding is None:
        raise RuntimeError("the recognition model produced no embedding for the detected face")
    height, width = image.shape[:2]
    crop_box = square_crop_box(face.bbox, width, height, crop_scale) if crop else (0, 0, width, height)
    work = crop_image(image, crop_box) if crop else image
    work_h, work_w = work.shape[:2]
    face_rect, lip_rect = analyzer.region_rects(face, work, crop_box[:2], face_expand_ratio, lip_expand_ratio)
    return PreparedFace(
        reference=_reference_tensor(work, size),
        identity=torch.from_numpy(np.asarray(face.embedding, dtype=np.float32).copy()),
        face_region=face_region_image(face_rect, work_w, work_h, size),
        masks=build_region_masks(face_rect, lip_rect, work_w, work_h, size // 8),
        crop_box=crop_box,
        face_rect=_scale_rect(face_rect, work_w, work_h, size),
        lip_rect=_scale_rect(lip_rect, work_w, work_h, size),
        detection_box=tuple(float(v) for v in face.bbox[:4]),
    )
