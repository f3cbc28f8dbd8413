"""Mask geometry of the face conditioning (docs/model.md §4.3–4.4)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from emocast_core.preprocess.face_masks import (
    blur_mask,
    build_region_masks,
    expand_rect,
    face_region_image,
    invert_mask_truncating,
    rect_mask,
    separated_masks,
    subtract_saturating,
)

# docs/release_quirks.md §12: the values v whose truncating inversion is 254 - v instead of 255 - v
SPEC_OFF_BY_ONE = {
    43, 59, 74, 75, 90, 91, 106, 107, 122, 123, 132, 133, 140, 141, 148, 149, 156, 157, 164, 165, 172,
    173, 180, 181, 188, 189, 196, 197, 198, 204, 205, 206, 212, 213, 214, 220, 221, 222, 228, 229, 230, 236,
    237, 238, 244, 245, 246, 252, 253, 254}


def test_expand_rect_arithmetic():
    # x extremes 10.5 -> 10 and 30.5 -> 30 (half to even), y extremes 20.4 -> 20 and 60.6 -> 61;
    # x: mid (10 + 30) // 2 = 20, half (20 * 1.2) // 2 = 12 -> (8, 32)
    # y: mid 81 // 2 = 40, half (41 * 1.2 = 49.19...) // 2 = 24 -> (16, 64)
    points = np.array([[10.5, 20.4], [30.5, 60.6], [20.0, 40.0]])
    assert expand_rect(points, 1.2, 100, 100) == (8, 16, 32, 64)


def test_expand_rect_rounds_half_to_even():
    # 12.5 -> 12 and 31.5 -> 32 give (12, 32); rounding half up would give 13 and 32 -> (13, 31)
    points = np.array([[12.5, 12.5], [31.5, 31.5]])
    assert expand_rect(points, 1.0, 100, 100) == (12, 12, 32, 32)


@pytest.mark.parametrize("low, high, ratio, expected", [
    (2, 42, 2.0, (0, 80)),       # mid 22, half 40 -> (-18, 62): shifted right by 18
    (70, 98, 2.0, (44, 100)),    # mid 84, half 28 -> (56, 112): shifted left by 12
    (30, 60, 1.0, (30, 60)),     # inside: unchanged
    (0, 100, 1.2, (-20, 100)),   # (-10, 110) -> (0, 120) -> (-20, 100): no second clamp
])
def test_expand_rect_border_shift(low, high, ratio, expected):
    x_points = np.array([[low, 50.0], [high, 50.0]])
    y_points = x_points[:, ::-1].copy()
    x0, _, x1, _ = expand_rect(x_points, ratio, 100, 200)
    _, y0, _, y1 = expand_rect(y_points, ratio, 200, 100)
    assert (x0, x1) == expected
    assert (y0, y1) == expected


def test_rect_mask_fills_end_exclusive_and_clamps_negative_start():
    mask = rect_mask((2, 3, 5, 7), 8, 10)
    assert mask.shape == (10, 8) and mask.dtype == np.uint8
    ys, xs = np.nonzero(mask)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (3, 6, 2, 4)
    assert set(np.unique(mask)) == {0, 255}
    # an oversized box keeps a negative start; it must cover from the left edge, not wrap around
    wide = rect_mask((-20, 0, 100, 10), 100, 10)
    assert (wide == 255).all()


def test_lip_points_inside_lip_mask():
    rng = np.random.default_rng(0)
    lips = np.array([230.0, 330.0]) + rng.uniform(-40, 40, size=(20, 2)) * [1.0, 0.4]
    rect = expand_rect(lips, 2.0, 512, 512)
    mask = rect_mask(rect, 512, 512)
    cols, rows = np.floor(lips).astype(int).T
    assert (mask[rows, cols] == 255).all()
    extent = lips.max(0) - lips.min(0)
    size = np.array([rect[2] - rect[0], rect[3] - rect[1]])
    np.testing.assert_allclose(size, 2.0 * extent, atol=3)


def test_truncating_inversion_matches_the_50_spec_values():
    values = np.arange(256, dtype=np.uint8).reshape(16, 16)
    inverted = invert_mask_truncating(values).astype(int).reshape(-1)
    v = np.arange(256)
    off = set(v[inverted != 255 - v].tolist())
    assert off == SPEC_OFF_BY_ONE
    assert (inverted[sorted(off)] == 254 - np.array(sorted(off))).all()


def test_blur_mask_range_and_shape():
    blurred = blur_mask(rect_mask((100, 150, 300, 350), 400, 400), 51)
    assert blurred.shape == (64, 64) and blurred.dtype == np.uint8
    assert blurred.min() == 0 and blurred.max() == 255
    # the rectangle's centre (200, 250) maps to pixel (32, 40) of the 64x64 map: the brightest area
    assert blurred[40, 32] >= 250 and blurred[0, 0] < 10
    assert blur_mask(rect_mask((0, 0, 10, 10), 400, 400), 31).shape == (64, 64)


def test_background_is_the_truncated_inverse_of_the_blurred_face():
    face_rect, lip_rect = (120, 90, 400, 430), (200, 330, 320, 390)
    background, _, _ = separated_masks(face_rect, lip_rect, 512, 512)
    face_blur = blur_mask(rect_mask(face_rect, 512, 512), 51).astype(int)
    total = background.astype(int) + face_blur
    assert set(np.unique(total)) <= {254, 255}
    expected_254 = np.isin(face_blur, list(SPEC_OFF_BY_ONE))
    assert ((total == 254) == expected_254).all()
    assert expected_254.any()


def test_face_mask_is_saturating_difference():
    difference = subtract_saturating(np.array([10, 200, 5], np.uint8), np.array([20, 100, 5], np.uint8))
    assert difference.tolist() == [0, 100, 0]
    # lips reaching below the face box: there the lip blur exceeds the face blur
    face_rect, lip_rect = (120, 90, 400, 400), (200, 360, 320, 470)
    _, face, lip = separated_masks(face_rect, lip_rect, 512, 512)
    face_blur = blur_mask(rect_mask(face_rect, 512, 512), 51).astype(int)
    assert (lip == blur_mask(rect_mask(lip_rect, 512, 512), 31)).all()
    assert (face.astype(int) == np.clip(face_blur - lip.astype(int), 0, 255)).all()
    assert (lip.astype(int) > face_blur).any()


@pytest.mark.parametrize("latent, sizes", [(64, [64, 32, 16, 8]), (16, [16, 8, 4, 2])])
def test_region_mask_levels(latent, sizes):
    # a wide face box in the upper-left part of a 512x512 image
    face_rect, lip_rect = (40, 30, 300, 200), (120, 140, 220, 180)
    masks = build_region_masks(face_rect, lip_rect, 512, 512, latent)
    background, face, lip = separated_masks(face_rect, lip_rect, 512, 512)
    assert [round(level.numel() ** 0.5) for level in masks.pose] == sizes
    for levels, source in ((masks.pose, background), (masks.face, face), (masks.lip, lip)):
        assert len(levels) == 4
        for level, side in zip(levels, sizes):
            assert level.shape == (side * side,) and level.dtype == torch.float32
            assert 0.0 <= float(level.min()) and float(level.max()) <= 1.0
            # bilinear downsizing keeps the mean
            assert abs(float(level.mean()) - source.mean() / 255) < 0.03
    if latent == 64:  # the 64 level is the blurred mask itself, /255
        assert torch.equal(masks.pose[0], torch.from_numpy(background).float().div(255).reshape(-1))
    # row-major flattening: the face (dark in the background mask) sits top-left and is wider than tall
    full = masks.pose[0].reshape(sizes[0], sizes[0])
    row, col = divmod(int(full.argmin()), sizes[0])
    assert row < sizes[0] // 2 and col < sizes[0] // 2
    dark = full < 0.5
    assert dark.any(0).sum() > dark.any(1).sum()


def test_face_region_image():
    region = face_region_image((10, 20, 50, 60), 100, 100, 100)
    assert region.shape == (3, 100, 100) and region.dtype == torch.float32
    expected = torch.zeros(100, 100)
    expected[20:60, 10:50] = 1.0
    assert all(torch.equal(channel, expected) for channel in region)
    # non-square source: the box is stretched to the square output
    stretched = face_region_image((50, 20, 150, 60), 200, 100, 64)
    assert stretched.shape == (3, 64, 64)
    assert float(stretched[0, 25, 32]) == 1.0 and float(stretched[0, 2, 2]) == 0.0
    assert float(stretched[0, 25, 14]) == 0.0 and float(stretched[0, 25, 18]) == 1.0


def test_bad_inputs_are_rejected():
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        expand_rect(np.zeros((4, 3)), 1.2, 10, 10)
    with pytest.raises(ValueError, match="NaN"):
        expand_rect(np.array([[np.nan, 1.0]]), 1.2, 10, 10)
    with pytest.raises(ValueError, match="empty rectangle"):
        rect_mask((5, 5, 5, 9), 10, 10)
    with pytest.raises(ValueError, match="multiple of 8"):
        build_region_masks((0, 0, 5, 5), (1, 1, 2, 2), 10, 10, 12)
    with pytest.raises(ValueError, match="odd"):
        blur_mask(np.zeros((8, 8), np.uint8), 50)
