"""The model grid: where a volume goes before the network sees it. Pure numpy on purpose.

`clinbundle.runtime.geometry.plan` builds every runtime's grid from `model_grid`, and the MONAI
bundle ships this very file as `scripts/model_grid.py`, so `python -m monai.bundle run` puts a
volume on the same voxels as clinbundle without importing clinbundle. MONAI's own `Spacingd`
cannot: it anchors the new grid on the first voxel's centre (or, with `scale_extent`, on a
position derived from the rounded shape), while the contract's grid keeps the input's field of
view with the outer voxel corners aligned, so that the way back is the exact inverse mapping.
"""

from __future__ import annotations

import numpy as np

#: Spacings equal within this relative tolerance are the same grid: no resampling.
SPACING_RTOL = 1e-3


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along each array axis (the norms of the affine's columns)."""
    s = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(s[0]), float(s[1]), float(s[2]))


def model_grid(
    shape: tuple[int, int, int], affine: np.ndarray, spacing: tuple | None
) -> tuple[tuple[int, int, int], np.ndarray]:
    """(shape, voxel -> world affine) of the grid at `spacing` that covers the oriented input
    grid (`shape`, `affine`); the input grid itself when `spacing` is None or already equal."""
    affine = np.asarray(affine, dtype=np.float64)
    shape = tuple(int(s) for s in shape)
    old = np.array(spacing_of(affine))
    if spacing is None or np.allclose(old, spacing, rtol=SPACING_RTOL):
        return shape, affine  # type: ignore[return-value]
    new = np.array(spacing, dtype=np.float64)
    # half up, after rounding away float32 noise: an affine read back from a NIfTI header
    # (35 x 1.29999995 mm) must give the grid the float64 one (35 x 1.3 mm = 45.5 -> 46) gives
    extent = np.round(np.array(shape) * old / new, 3)
    m_shape = tuple(max(1, int(np.floor(x + 0.5))) for x in extent)
    m_affine = np.eye(4)
    m_affine[:3, :3] = affine[:3, :3] / old * new
    corner = affine @ np.array([-0.5, -0.5, -0.5, 1.0])
    m_affine[:3, 3] = corner[:3] + m_affine[:3, :3] @ np.full(3, 0.5)
    return m_shape, m_affine  # type: ignore[return-value]


def grid_like(image, spacing: tuple | None):
    """A MONAI MetaTensor standing for the model grid of a channel-first `image` (its meta, the
    grid's affine and shape; never filled), for `ResampleToMatchd(key_dst=...)` in the bundle."""
    import copy

    import torch
    from monai.data import MetaTensor

    shape, affine = model_grid(tuple(image.shape[1:]), np.asarray(image.affine), spacing)
    meta = copy.deepcopy(dict(image.meta))
    grid = MetaTensor(torch.empty((1, *shape), dtype=torch.float32), meta=meta)
    grid.affine = torch.as_tensor(affine, dtype=torch.float64)
    return grid
