"""Slices of a volume as RGB images with label overlays, in plain numpy.

Why not matplotlib: the demo re-renders one slice on every slider move, and a numpy blend of
a uint8 slice is a few microseconds, has no global state (thread-safe under Gradio's worker
threads) and gives byte-identical images for identical inputs, which the browser test relies
on to tell a real change from a re-render.

Axes: volumes are shown in their voxel axes (no reorientation, as the model sees them). With
the first three NIfTI axes i, j, k: sagittal = fixed i, coronal = fixed j, axial = fixed k;
each slice is rotated so that the last in-plane axis points up.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

View = Literal["axial", "coronal", "sagittal"]
VIEWS: tuple[View, ...] = ("axial", "coronal", "sagittal")
#: Which voxel axis a view holds fixed.
VIEW_AXIS: dict[View, int] = {"sagittal": 0, "coronal": 1, "axial": 2}

PREDICTION_RGB = np.array([255, 64, 32], dtype=np.float32)  # filled, at the chosen opacity
TRUTH_RGB = np.array([40, 230, 90], dtype=np.uint8)  # outline, always opaque
MIN_DISPLAY_PIXELS = 256  # small volumes are enlarged (nearest neighbour) to about this size


def display_window(volume: np.ndarray) -> tuple[float, float]:
    """Grey-level window from the 1st and 99th percentile: robust to a few extreme voxels."""
    lo, hi = np.percentile(volume, [1.0, 99.0])
    if not hi > lo:
        lo, hi = float(volume.min()), float(volume.max())
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def take_slice(volume: np.ndarray, view: View, index: int) -> np.ndarray:
    """One 2-D slice of a 3-D array, rotated for display; index is clipped into range."""
    axis = VIEW_AXIS[view]
    index = int(np.clip(index, 0, volume.shape[axis] - 1))
    return np.rot90(np.take(volume, index, axis=axis))


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask that touch a pixel outside it (4-neighbourhood)."""
    padded = np.pad(mask, 1, mode="constant", constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~inner


def _enlarge(rgb: np.ndarray) -> np.ndarray:
    factor = max(1, -(-MIN_DISPLAY_PIXELS // max(rgb.shape[:2])))
    if factor == 1:
        return rgb
    return np.repeat(np.repeat(rgb, factor, axis=0), factor, axis=1)


def render_slice(
    image: np.ndarray,
    view: View,
    index: int,
    window: tuple[float, float],
    prediction: np.ndarray | None = None,
    truth: np.ndarray | None = None,
    opacity: float = 0.5,
) -> np.ndarray:
    """RGB uint8 (H, W, 3): grey image, prediction (label > 0) filled, ground truth outlined.

    The prediction is alpha-blended so the anatomy under it stays visible; the ground truth
    is an outline so both can be compared on the same slice.
    """
    lo, hi = window
    grey = take_slice(image, view, index).astype(np.float32)
    grey = np.clip((grey - lo) / (hi - lo), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if prediction is not None:
        mask = take_slice(prediction, view, index) > 0
        alpha = float(np.clip(opacity, 0.0, 1.0))
        rgb[mask] = (1.0 - alpha) * rgb[mask] + alpha * PREDICTION_RGB
    out = np.round(rgb).astype(np.uint8)
    if truth is not None:
        out[_outline(take_slice(truth, view, index) > 0)] = TRUTH_RGB
    return _enlarge(out)


def dice_per_label(prediction: np.ndarray, truth: np.ndarray, labels: dict[str, str]) -> dict:
    """Dice of each foreground label; NaN when the label is in neither volume (undefined)."""
    if prediction.shape != truth.shape:
        raise ValueError(
            f"prediction shape {prediction.shape} differs from ground truth {truth.shape}"
        )
    scores: dict[str, float] = {}
    for key, name in sorted(labels.items(), key=lambda kv: int(kv[0])):
        if int(key) == 0:
            continue
        p, t = prediction == int(key), truth == int(key)
        denom = int(p.sum()) + int(t.sum())
        scores[name] = float("nan") if denom == 0 else 2.0 * int((p & t).sum()) / denom
    return scores
