"""Validation metrics for tubular structures, each with its direction.

Dice, MASD (mean average surface distance, symmetric) and HD95 come from MONAI. clDice
(Shit et al., CVPR 2021) has a MONAI *loss* but no metric, so it is computed here from hard
skeletons (scikit-image): clDice = 2 Tprec Tsens / (Tprec + Tsens), with Tprec the fraction of
the predicted skeleton inside the reference and Tsens the fraction of the reference skeleton
inside the prediction.

`compound` ranks models for vessel work, where topology and boundary both matter:
    compound = 0.5 * clDice + 0.5 / (1 + MASD_mm)
It lies in [0, 1] (higher is better): a perfect mask scores 1; each millimetre of mean surface
error costs as much as the clDice term can give at 1 mm.

An empty prediction has no surface: MASD and HD95 then count as the volume's diagonal (the
worst possible distance) instead of infinity, so means and checkpoints stay finite.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from monai.networks.utils import one_hot
from skimage.morphology import skeletonize

#: metric -> "max" (higher is better) or "min".
DIRECTIONS: dict[str, str] = {
    "val_loss": "min",
    "dice": "max",
    "cldice": "max",
    "masd": "min",
    "hd95": "min",
    "compound": "max",
}


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None or not np.isfinite(old):
        return bool(np.isfinite(new))
    return new > old if DIRECTIONS[metric] == "max" else new < old


def cldice(pred: np.ndarray, ref: np.ndarray) -> float:
    """clDice of two binary 3-D masks; 1.0 when both are empty, 0.0 when only one is."""
    pred, ref = pred.astype(bool), ref.astype(bool)
    if not pred.any() and not ref.any():
        return 1.0
    if not pred.any() or not ref.any():
        return 0.0
    sp, sr = skeletonize(pred), skeletonize(ref)
    tprec = (sp & ref).sum() / max(sp.sum(), 1)
    tsens = (sr & pred).sum() / max(sr.sum(), 1)
    return float(0.0 if tprec + tsens == 0 else 2 * tprec * tsens / (tprec + tsens))


def compound(cldice_value: float, masd_mm: float) -> float:
    return 0.5 * cldice_value + 0.5 / (1.0 + masd_mm)


def segmentation_metrics(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: tuple[float, ...]
) -> dict[str, float]:
    """Metrics of one label volume against its reference, averaged over foreground classes."""
    p = one_hot(torch.as_tensor(pred[None, None]).long(), num_classes, dim=1)
    r = one_hot(torch.as_tensor(ref[None, None]).long(), num_classes, dim=1)
    diagonal = float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on empty masks; handled below
        dice = compute_dice(p, r, include_background=False, ignore_empty=False)
        masd = compute_average_surface_distance(
            p, r, include_background=False, symmetric=True, spacing=list(spacing)
        )
        hd95 = compute_hausdorff_distance(
            p, r, include_background=False, percentile=95, spacing=list(spacing)
        )

    def finite(t: torch.Tensor) -> float:
        v = torch.nan_to_num(t.float(), nan=diagonal, posinf=diagonal)
        return float(v.mean())

    cl = float(np.mean([cldice(pred == c, ref == c) for c in range(1, num_classes)]))
    m = finite(masd)
    return {
        "dice": float(torch.nan_to_num(dice.float(), nan=0.0).mean()),
        "cldice": cl,
        "masd": m,
        "hd95": finite(hd95),
        "compound": compound(cl, m),
    }
