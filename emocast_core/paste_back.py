"""Put the generated square face crop back into the full-size portrait (or a sequence of frames).

`prepare_face(crop=True)` animates a square `crop_box` around the face; this module scales each
generated frame back to that box and blends it into the original picture with a feathered edge, so a
talking head can sit inside a wide shot. The box may reach past the picture's border (`crop_image` pads
by repeating the border there); only the part inside the picture is pasted.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .preprocess.face_masks import Rect

__all__ = ["feather_mask", "paste_back"]


def feather_mask(height: int, width: int, feather: int, soft_edges: tuple[bool, bool, bool, bool]) -> torch.Tensor:
    """(height, width) weights: 1 inside, falling linearly to 0 over `feather` pixels at the soft edges.

    `soft_edges` is (top, bottom, left, right); a hard edge (one lying on the picture's border) stays 1,
    otherwise the original picture would show through along the border."""
    if feather < 0:
        raise ValueError(f"feather must be >= 0 pixels, got {feather}")
    weights = torch.ones(height, width)
    if feather == 0:
        return weights
    rows = torch.arange(height, dtype=torch.float32)
    cols = torch.arange(width, dtype=torch.float32)
    # pixel i of a ramp sits (i + 0.5) px inside the edge
    ramps = ((rows + 0.5)[:, None], (height - rows - 0.5)[:, None], (cols + 0.5)[None], (width - cols - 0.5)[None])
    for soft, distance in zip(soft_edges, ramps):
        if soft:
            weights = torch.minimum(weights, (distance / feather).clamp(max=1.0))
    return weights


def _check_frames(name: str, frames: torch.Tensor) -> None:
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[1] != 3:
        shape = tuple(frames.shape) if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"{name} must be a (N, 3, H, W) tensor, got {shape}")
    if frames.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 frames)")


def paste_back(background: torch.Tensor, frames: torch.Tensor, crop_box: Rect, feather: int = 16) -> torch.Tensor:
    """Blend generated `frames` (N, 3, s, s) into `background` (1 or >= N, 3, H, W), both float in [0, 1].

    Frame i goes into background i (a single background is used for every frame); `crop_box`
    (x0, y0, x1, y1) is where the crop was taken from the background. Returns (N, 3, H, W) float32."""
    _check_frames("frames", frames)
    _check_frames("background", background)
    n, m = frames.shape[0], background.shape[0]
    if m != 1 and m < n:
        raise ValueError(f"background has {m} frames but {n} generated frames need one each (or give a single "
                         "image for all of them)")
    x0, y0, x1, y1 = (int(v) for v in crop_box)
    height, width = background.shape[-2:]
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"crop box {crop_box} is empty")
    # visible part of the box inside the picture
    vx0, vy0, vx1, vy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
    if vx1 <= vx0 or vy1 <= vy0:
        raise ValueError(f"crop box {crop_box} lies outside the {width}x{height} background; paste the face into "
                         "the image it was detected in")
    scaled = F.interpolate(frames.float(), size=(y1 - y0, x1 - x0), mode="bilinear", align_corners=False,
                           antialias=True).clamp(0, 1)
    patch = scaled[:, :, vy0 - y0:vy1 - y0, vx0 - x0:vx1 - x0]
    weights = feather_mask(vy1 - vy0, vx1 - vx0, feather, (vy0 > 0, vy1 < height, vx0 > 0, vx1 < width))
    out = (background[:1].expand(n, -1, -1, -1) if m == 1 else background[:n]).float().clone()
    region = out[:, :, vy0:vy1, vx0:vx1]
    out[:, :, vy0:vy1, vx0:vx1] = torch.lerp(region, patch, weights.to(out.device))
    return out
