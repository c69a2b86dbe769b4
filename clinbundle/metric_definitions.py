"""Every metric defined once: name, direction, unit, display format, description, function.

Training (best_* checkpoints), `evaluate`, `compare`, `promote`, the model card and the demo all
read this registry, so a metric means the same thing everywhere. A custom metric registers the
same way (`register(MetricDef(...))`, e.g. from a module passed to `clinbundle evaluate
--metrics-module`) and is then computed like the built-in ones, also from saved predictions.

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

Pure numpy/MONAI/scikit-image: serving and demo code import it without training code.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
)
from monai.networks.utils import one_hot
from skimage.morphology import skeletonize

from clinbundle.runtime.errors import ConfigError

Direction = Literal["max", "min"]


@dataclass
class Case:
    """One predicted label volume and its reference, on the case's own grid (mm spacing).

    Shared intermediate results are cached, so metrics that build on each other (compound on
    clDice and MASD) compute them once per case.
    """

    pred: np.ndarray
    ref: np.ndarray
    num_classes: int
    spacing: tuple[float, ...]

    @cached_property
    def _one_hot(self) -> tuple[torch.Tensor, torch.Tensor]:
        p = one_hot(torch.as_tensor(self.pred[None, None]).long(), self.num_classes, dim=1)
        r = one_hot(torch.as_tensor(self.ref[None, None]).long(), self.num_classes, dim=1)
        return p, r

    @cached_property
    def diagonal(self) -> float:
        return float(np.linalg.norm(np.array(self.pred.shape) * np.array(self.spacing)))

    def _finite(self, t: torch.Tensor) -> float:
        return float(torch.nan_to_num(t.float(), nan=self.diagonal, posinf=self.diagonal).mean())

    @cached_property
    def dice(self) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI warns on empty masks; handled here
            d = compute_dice(*self._one_hot, include_background=False, ignore_empty=False)
        return float(torch.nan_to_num(d.float(), nan=0.0).mean())

    @cached_property
    def masd(self) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = compute_average_surface_distance(
                *self._one_hot, include_background=False, symmetric=True, spacing=list(self.spacing)
            )
        return self._finite(d)

    @cached_property
    def hd95(self) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = compute_hausdorff_distance(
                *self._one_hot, include_background=False, percentile=95, spacing=list(self.spacing)
            )
        return self._finite(d)

    @cached_property
    def cldice(self) -> float:
        return float(
            np.mean([cldice(self.pred == c, self.ref == c) for c in range(1, self.num_classes)])
        )


@dataclass(frozen=True)
class MetricDef:
    """One metric. `fn` scores a `Case`; None for metrics only the training loop can compute
    (val_loss is the loss of the network's output, not a function of two masks)."""

    name: str
    direction: Direction
    unit: str
    fmt: str
    description: str
    fn: Callable[[Case], float] | None = None

    def format(self, value: float) -> str:
        text = format(float(value), self.fmt)
        return f"{text} {self.unit}" if self.unit else text

    def sign(self) -> float:
        """+1 where higher is better, -1 where lower is: sign * (a - b) > 0 means a is better."""
        return 1.0 if self.direction == "max" else -1.0

    def is_better(self, new: float, old: float | None) -> bool:
        if old is None or not np.isfinite(old):
            return bool(np.isfinite(new))
        return self.sign() * (new - old) > 0


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


_REGISTRY: dict[str, MetricDef] = {}


def register(metric: MetricDef, replace: bool = False) -> MetricDef:
    """Add a metric; a name is defined once unless `replace` says otherwise."""
    if metric.direction not in ("max", "min"):
        raise ConfigError(f"metric '{metric.name}': direction must be 'max' or 'min'")
    if metric.name in _REGISTRY and not replace:
        raise ConfigError(f"metric '{metric.name}' is already defined")
    _REGISTRY[metric.name] = metric
    return metric


def unregister(name: str) -> None:
    _REGISTRY.pop(name, None)


def get(name: str) -> MetricDef:
    if name not in _REGISTRY:
        raise ConfigError(f"unknown metric '{name}'; defined: {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def known(name: str) -> MetricDef | None:
    """The definition of `name`, or None (for display code that shows what it cannot format)."""
    return _REGISTRY.get(name)


def all_metrics() -> list[MetricDef]:
    return list(_REGISTRY.values())


def case_metrics() -> list[str]:
    """Names of the metrics computed from a prediction and its reference (not val_loss)."""
    return [m.name for m in _REGISTRY.values() if m.fn is not None]


def directions() -> dict[str, Direction]:
    return {m.name: m.direction for m in _REGISTRY.values()}


def compute(
    pred: np.ndarray,
    ref: np.ndarray,
    num_classes: int,
    spacing: tuple[float, ...],
    names: Iterable[str] | None = None,
) -> dict[str, float]:
    """The case metrics (`names`, default all registered) of one label volume, averaged over
    foreground classes."""
    case = Case(pred, ref, num_classes, tuple(float(s) for s in spacing))
    chosen = case_metrics() if names is None else list(names)
    out = {}
    for name in chosen:
        m = get(name)
        if m.fn is None:
            raise ConfigError(f"metric '{name}' is computed by the training loop only")
        out[name] = float(m.fn(case))
    return out


for _m in (
    MetricDef(
        "val_loss",
        "min",
        "",
        ".4f",
        "Training loss of the validation volume's blended softmax (training loop only).",
    ),
    MetricDef(
        "dice",
        "max",
        "",
        ".4f",
        "Dice overlap of the masks, mean over foreground classes (MONAI).",
        lambda c: c.dice,
    ),
    MetricDef(
        "cldice",
        "max",
        "",
        ".4f",
        "Centreline Dice: skeleton precision and sensitivity (topology of thin structures).",
        lambda c: c.cldice,
    ),
    MetricDef(
        "masd",
        "min",
        "mm",
        ".3f",
        "Symmetric mean average surface distance (MONAI); empty prediction = volume diagonal.",
        lambda c: c.masd,
    ),
    MetricDef(
        "hd95",
        "min",
        "mm",
        ".3f",
        "95th percentile Hausdorff distance (MONAI); empty prediction = volume diagonal.",
        lambda c: c.hd95,
    ),
    MetricDef(
        "compound",
        "max",
        "",
        ".4f",
        "0.5 clDice + 0.5 / (1 + MASD mm): topology and boundary in one score in [0, 1].",
        lambda c: compound(c.cldice, c.masd),
    ),
):
    register(_m)
