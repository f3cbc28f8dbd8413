"""Face and lip region masks of the EmoCAST conditioning (pure geometry, no models).

Reproduces the official mask recipe (docs/model.md §4.3–4.4, docs/release_quirks.md §12) bit for bit:

* a rectangle from a landmark subset, expanded around its centre with integer arithmetic and shifted
  back into the image (``expand_rect``);
* the FaceLocator input: the face rectangle as a 3-channel [0, 1] image resized with PIL bilinear
  (``face_region_image``);
* the three attention masks: rectangles resized to 64x64 with OpenCV INTER_LINEAR, Gaussian-blurred
  (face kernel 51, lip kernel 31), min-max normalised to uint8, then combined (``separated_masks``)
  and PIL-bilinear resized to the four UNet resolutions (``build_region_masks``).

A rectangle is ``(x0, y0, x1, y1)`` in pixels, end-exclusive, as the official slicing uses it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from PIL import Image

logger = logging.getLogger(__name__)

Rect = tuple[int, int, int, int]

BLUR_SIZE = 64  # the official blurs at a fixed 64x64, whatever the output size
FACE_BLUR_KERNEL = 51
LIP_BLUR_KERNEL = 31
MASK_LEVELS = 4  # UNet resolutions: latent /1, /2, /4, /8


def _check_size(width: int, height: int) -> None:
    if int(width) < 1 or int(height) < 1:
        raise ValueError(f"image size must be positive, got width={width}, height={height}")


def _check_rect(rect: Rect) -> Rect:
    if len(rect) != 4:
        raise ValueError(f"a rectangle is (x0, y0, x1, y1); got {rect!r}")
    x0, y0, x1, y1 = (int(v) for v in rect)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"empty rectangle {rect!r}: need x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def _expand_axis(low: float, high: float, ratio: float, limit: int) -> tuple[int, int]:
    # float64 floor divisions on integral values, exactly as the official numpy code evaluates them
    mid = (high + low) // 2
    half = ((high - low) * ratio) // 2
    start, end = mid - half, mid + half
    if start < 0:
        end -= start
        start = 0.0
    if end > limit:
        start -= end - limit
        end = float(limit)
    # No second clamp: a box larger than the image keeps a negative start (see rect_mask).
    return int(start), int(end)


def expand_rect(points: np.ndarray, ratio: float, width: int, height: int) -> Rect:
    """Bounding rectangle of ``points`` (N, 2) pixel (x, y), expanded by ``ratio`` (docs/model.md §4.3).

    The extremes are rounded half-to-even (``np.round``), each side is scaled by ``ratio`` around the
    floored centre with floored half-lengths, and a box crossing the image border is shifted back
    inside. Returns ``(x0, y0, x1, y1)``, end-exclusive.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2 or pts.shape[0] == 0:
        raise ValueError(f"points must be an (N, 2) array of (x, y) with N >= 1; got shape {pts.shape}")
    if not np.isfinite(pts).all():
        raise ValueError("points contain NaN or infinite coordinates")
    if not ratio > 0:
        raise ValueError(f"expand ratio must be positive, got {ratio}")
    _check_size(width, height)
    low = np.round(pts.min(axis=0))
    high = np.round(pts.max(axis=0))
    x0, x1 = _expand_axis(float(low[0]), float(high[0]), float(ratio), int(width))
    y0, y1 = _expand_axis(float(low[1]), float(high[1]), float(ratio), int(height))
    return x0, y0, x1, y1


def rect_mask(rect: Rect, width: int, height: int) -> np.ndarray:
    """(height, width) uint8 image, 255 inside ``rect`` and 0 elsewhere.

    A negative start (only possible when the expanded box is larger than the image) is clamped to 0.
    The official numpy slice would wrap it around to the far edge and leave most of the box empty;
    we deliberately do not reproduce that.
    """
    x0, y0, x1, y1 = _check_rect(rect)
    _check_size(width, height)
    mask = np.zeros((int(height), int(width)), dtype=np.uint8)
    mask[max(y0, 0):max(y1, 0), max(x0, 0):max(x1, 0)] = 255
    return mask


def blur_mask(mask: np.ndarray, kernel: int, size: int = BLUR_SIZE) -> np.ndarray:
    """Resize a uint8 mask to ``size`` x ``size`` (INTER_LINEAR), Gaussian-blur it, min-max to 0..255.

    The blur sigma follows OpenCV's default rule for the kernel (8.0 for 51, 5.0 for 31). A constant
    input normalises to all zeros (OpenCV's behaviour, kept for parity).
    """
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} with shape {mask.shape}")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"Gaussian kernel size must be a positive odd number, got {kernel}")
    resized = cv2.resize(mask, (size, size), interpolation=cv2.INTER_LINEAR)
    blurred = cv2.GaussianBlur(resized, (kernel, kernel), 0)
    return cv2.normalize(blurred, None, 0, 255, cv2.NORM_MINMAX)


def invert_mask_truncating(mask: np.ndarray) -> np.ndarray:
    """``floor((1 - v/255) * 255)`` in float64, as the official background mask is made.

    Equals ``255 - v`` except for 50 values of ``v`` where float rounding gives ``254 - v``.
    """
    if mask.dtype != np.uint8:
        raise ValueError(f"mask must be uint8, got {mask.dtype}")
    inverted = 1.0 - mask.astype(np.float64) / 255.0
    return (inverted * 255.0).astype(np.uint8)


def subtract_saturating(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """uint8 ``a - b`` with negatives set to 0."""
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.shape != b.shape:
        raise ValueError(f"need two uint8 masks of one shape, got {a.dtype}{a.shape} and {b.dtype}{b.shape}")
    # numpy rather than cv2.subtract: OpenCV reads a short 1-D array as a scalar, not as pixels
    return np.clip(a.astype(np.int16) - b.astype(np.int16), 0, 255).astype(np.uint8)


def _warn_if_full(rect: Rect, width: int, height: int, name: str) -> None:
    x0, y0, x1, y1 = rect
    if x0 <= 0 and y0 <= 0 and x1 >= width and y1 >= height:
        # The blur of a full-image box is constant and normalises to zeros: the region vanishes.
        logger.warning(
            "the %s rectangle covers the whole %dx%d image, so its blurred mask is empty; "
            "use a portrait with more margin around the face (or crop=True)", name, width, height)


def separated_masks(face_rect: Rect, lip_rect: Rect, width: int,
                    height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official 64x64 uint8 ``(sep_background, sep_face, sep_lip)`` masks for an image of this size."""
    face_rect, lip_rect = _check_rect(face_rect), _check_rect(lip_rect)
    _warn_if_full(face_rect, width, height, "face")
    _warn_if_full(lip_rect, width, height, "lip")
    face_blur = blur_mask(rect_mask(face_rect, width, height), FACE_BLUR_KERNEL)
    lip_blur = blur_mask(rect_mask(lip_rect, width, height), LIP_BLUR_KERNEL)
    return invert_mask_truncating(face_blur), subtract_saturating(face_blur, lip_blur), lip_blur


def _to_unit_tensor(image: Image.Image) -> torch.Tensor:
    # same arithmetic as torchvision's ToTensor: uint8 -> float32, then / 255
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True)).float().div(255)


def resize_mask_levels(mask: np.ndarray, latent_size: int) -> list[torch.Tensor]:
    """A uint8 mask at the four UNet resolutions (PIL bilinear), each flattened row-major to (L,)."""
    if latent_size < 8 or latent_size % 8:
        raise ValueError(f"latent size must be a positive multiple of 8 (output size / 8), got {latent_size}")
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"mask must be a 2-D uint8 array, got {mask.dtype} with shape {mask.shape}")
    image = Image.fromarray(mask)  # 2-D uint8 -> mode "L"
    levels = []
    for level in range(MASK_LEVELS):
        side = latent_size >> level
        resized = image.resize((side, side), Image.Resampling.BILINEAR)
        levels.append(_to_unit_tensor(resized).reshape(-1))
    return levels


@dataclass
class RegionMasks:
    """Attention masks of the emotive audio module, one (L,) float32 tensor in [0, 1] per UNet level.

    ``pose`` is the background mask (the whole frame outside the face box: the head-pose branch; the release
    calls it ``full_mask``), ``face`` the face without the lips, ``lip`` the lips; level i has side
    ``latent_size / 2**i``. The same three names, in this order, run from the prepared data
    (``masks/pose.png``, ``face.png``, ``lip.png``) through the sampler to the audio attention's branches.
    """

    pose: list[torch.Tensor]
    face: list[torch.Tensor]
    lip: list[torch.Tensor]


def build_region_masks(face_rect: Rect, lip_rect: Rect, width: int, height: int,
                       latent_size: int) -> RegionMasks:
    """Attention masks for rectangles given in an image of ``width`` x ``height`` pixels."""
    background, face, lip = separated_masks(face_rect, lip_rect, width, height)
    return RegionMasks(pose=resize_mask_levels(background, latent_size),
                       face=resize_mask_levels(face, latent_size),
                       lip=resize_mask_levels(lip, latent_size))


def face_region_image(face_rect: Rect, width: int, height: int, out_size: int) -> torch.Tensor:
    """FaceLocator input: the face rectangle as a (3, out_size, out_size) float32 image in [0, 1]."""
    if out_size < 1:
        raise ValueError(f"output size must be positive, got {out_size}")
    # the official reads the 0/255 mask PNG back as RGB before resizing
    mask = Image.fromarray(rect_mask(face_rect, width, height)).convert("RGB")
    resized = mask.resize((out_size, out_size), Image.Resampling.BILINEAR)
    return _to_unit_tensor(resized).permute(2, 0, 1).contiguous()
