"""The model registry: challengers in, champions promoted only on evidence.

Aliases, not stages (MLflow 3): every training registers a version as `challenger`;
`promote` scores challenger and champion on the same held-out volumes and moves `champion` only
if the challenger is better, recording the numbers and the decision as tags on both versions.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clinbundle.runtime.errors import ModelResolutionError, TrackingError
from clinbundle.runtime.geometry import spacing_of

log = logging.getLogger("clinbundle.registry")

CHALLENGER, CHAMPION = "challenger", "champion"
#: on runs and versions trained with `--production` (all labelled data, no validation split)
PRODUCTION_TAG = "clinbundle.production"


def register_challenger(
    model_uri: str, name: str, run_id: str | None = None, tags: dict[str, str] | None = None
) -> str:
    """Register `model_uri` under `name` with alias challenger; all or nothing."""
    client = MlflowClient()
    try:
        mv = mlflow.register_model(model_uri, name)
    except MlflowException as e:
        raise TrackingError(f"could not register {model_uri} as '{name}': {e.message}") from None
    try:
        for k, v in (tags or {}).items():
            client.set_model_version_tag(name, mv.version, k, v)
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
    except BaseException:
        # no half-registered model: a version without its alias and tags is removed again
        client.delete_model_version(name, mv.version)
        raise
    log.info("registered %s version %s as @%s (run %s)", name, mv.version, CHALLENGER, run_id)
    return str(mv.version)


def version_by_alias(name: str, alias: str) -> ModelVersion | None:
    client = MlflowClient()
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


@dataclass
class Score:
    version: str
    metric: str
    per_volume: list[float]
    mean: float
    ci95: tuple[float, float]


def bootstrap_ci(values: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% CI of the mean (paired differences use the same helper)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(n, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def load_eval_set(data_dir: Path) -> tuple[list[str], list[np.ndarray], list[np.ndarray], list]:
    """The held-out pairs of an MSD folder (`test` entries with labels), else an error."""
    from clinbundle.training.data import read_dataset  # training deps stay out of serving paths

    ds = read_dataset(data_dir)
    if not ds.test:
        raise ModelResolutionError(
            f"{data_dir}/dataset.json has no labelled 'test' entries to compare models on; "
            "add {image, label} pairs under 'test' (clinbundle data synth writes imagesTs/labelsTs)"
        )
    names, images, labels, affines = [], [], [], []
    for it in ds.test:
        img = nib.load(it["image"])
        names.append(it["case"])
        images.append(np.asarray(img.dataobj, dtype=np.float32))
        labels.append(np.asarray(nib.load(it["label"]).dataobj).astype(np.uint8))
        affines.append(img.affine)
    return names, images, labels, affines


def score_version(name: str, version: str, eval_set: tuple, metric: str) -> Score:
    from clinbundle.training.metrics import segmentation_metrics

    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    contract = model.metadata.metadata["inference_contract"]
    _, images, labels, affines = eval_set
    values = []
    for img, lab, affine in zip(images, labels, affines, strict=True):
        # on each case's own grid, as a clinician measures: the model maps its answer back
        params = {"affine": np.asarray(affine).ravel().tolist(), "output": "labels"}
        pred = model.predict(img[None, None], params=params)[0]
        sp = spacing_of(affine)
        values.append(segmentation_metrics(pred, lab, contract["num_classes"], sp)[metric])
    arr = np.array(values)
    return Score(version, metric, values, float(arr.mean()), bootstrap_ci(arr))


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger: Score
    champion: Score | None
    difference_ci95: tuple[float, float] | None


def promote(
    name: str,
    data_dir: Path,
    metric: str = "dice",
    minimum: float = 0.5,
    min_improvement: float = 0.0,
) -> Decision:
    """Score @challenger (and @champion, if any) on the held-out set; move champion if better.

    First champion: the challenger must reach `minimum` on `metric`. Later: its mean must beat
    the champion's by more than `min_improvement` in the metric's direction. The decision and its
    numbers are tags on both versions (`promotion_*`), whatever the outcome.
    """
    from clinbundle.training.metrics import DIRECTIONS

    if metric not in DIRECTIONS or metric == "val_loss":
        raise ModelResolutionError(
            f"cannot promote on '{metric}'; choose one of "
            f"{[m for m in DIRECTIONS if m != 'val_loss']}"
        )
    client = MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise ModelResolutionError(
            f"no registered model '{name}' in {mlflow.get_registry_uri()}; train one first "
            "(`clinbundle train`) or check --model and MLFLOW_TRACKING_URI"
        ) from None
    challenger = version_by_alias(name, CHALLENGER)
    if challenger is None:
        raise ModelResolutionError(f"model '{name}' has no @{CHALLENGER} version to promote")
    if challenger.tags.get(PRODUCTION_TAG) == "true":
        raise ModelResolutionError(
            f"version {challenger.version} of '{name}' was trained with --production (all "
            "labelled data, no validation split): promote does not decide on it. Decide on the "
            "recipe's cross-validated runs, then set the alias yourself "
            f"(MlflowClient().set_registered_model_alias('{name}', '{CHAMPION}', "
            f"'{challenger.version}'))"
        )
    champion = version_by_alias(name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        raise ModelResolutionError(
            f"version {challenger.version} of '{name}' is already @{CHAMPION}; train a new challenger"
        )

    eval_set = load_eval_set(data_dir)
    sign = 1.0 if DIRECTIONS[metric] == "max" else -1.0
    ch = score_version(name, str(challenger.version), eval_set, metric)
    if champion is None:
        cp, diff_ci = None, None
        ok = sign * (ch.mean - minimum) >= 0
        reason = (
            f"first champion: {metric} {ch.mean:.4f} "
            f"{'meets' if ok else 'misses'} the minimum {minimum}"
        )
    else:
        cp = score_version(name, str(champion.version), eval_set, metric)
        diff = sign * (np.array(ch.per_volume) - np.array(cp.per_volume))
        diff_ci = bootstrap_ci(diff)
        ok = float(diff.mean()) > min_improvement
        reason = (
            f"challenger v{ch.version} {metric} {ch.mean:.4f} vs champion v{cp.version} "
            f"{cp.mean:.4f}: {'better' if ok else 'not better'} by more than {min_improvement} "
            f"(paired difference 95% CI {diff_ci[0]:.4f}..{diff_ci[1]:.4f})"
        )
    decision = Decision(ok, reason, ch, cp, diff_ci)
    _record(name, decision, eval_set[0], data_dir)
    if ok:
        client.set_registered_model_alias(name, CHAMPION, ch.version)
    log.info("promotion of %s v%s: %s", name, ch.version, reason)
    return decision


def _record(name: str, d: Decision, cases: list[str], data_dir: Path) -> None:
    client = MlflowClient()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {
        "promotion_time": when,
        "promotion_metric": d.challenger.metric,
        "promotion_eval_set": f"{data_dir} ({len(cases)} volumes: {','.join(cases)})"[:4000],
        "promotion_reason": d.reason,
    }
    for score, role in ((d.challenger, CHALLENGER), (d.champion, CHAMPION)):
        if score is None:
            continue
        tags = common | {
            "promotion_role": role,
            "promotion_decision": "promoted" if d.promoted else "rejected",
            "promotion_mean": f"{score.mean:.6f}",
            "promotion_ci95": f"{score.ci95[0]:.6f},{score.ci95[1]:.6f}",
        }
        if role == CHAMPION:
            tags["promotion_decision"] = "replaced" if d.promoted else "kept"
            tags["promotion_challenger_version"] = d.challenger.version
        elif d.champion is not None:
            tags["promotion_champion_version"] = d.champion.version
        for k, v in tags.items():
            client.set_model_version_tag(name, score.version, k, v)
