"""The training loop's view of the metric registry (`clinbundle.metric_definitions`).

The definitions live outside `training` so serving, the demo and the model card can read them
without training code; these names stay for the loop and older callers.
"""

from __future__ import annotations

import numpy as np

from clinbundle.metric_definitions import cldice, compound, compute, directions, get

__all__ = ["DIRECTIONS", "cldice", "compound", "directions", "is_better", "segmentation_metrics"]

#: metric -> "max" (higher is better) or "min", for the built-in metrics (a snapshot taken at
#: import; `directions()` also lists metrics registered later).
DIRECTIONS: dict[str, str] = dict(directions())


def is_better(metric: str, new: float, old: float | None) -> bool:
    return get(metric).is_better(new, old)


def segmentation_metrics(
    pred: np.ndarray, ref: np.ndarray, num_classes: int, spacing: tuple[float, ...]
) -> dict[str, float]:
    """Every registered case metric of one label volume, averaged over foreground classes."""
    return compute(pred, ref, num_classes, spacing)
