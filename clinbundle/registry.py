"""The model registry: challengers in, champions promoted only on evidence.

Aliases, not stages (MLflow 3): every training registers a version as `challenger`;
`promote` scores challenger and champion on the same held-out volumes and moves `champion` only
if the lower bound of the paired difference's BCa CI clears the margin, recording the numbers,
the decision and the rule that decided as tags on both versions.
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

from clinbundle.analysis.stats import Interval, mean_ci, paired_difference_ci
from clinbundle.metric_definitions import case_metrics, compute
from clinbundle.metric_definitions import get as get_metric
from clinbundle.runtime.errors import ClinbundleError, ModelResolutionError, TrackingError
from clinbundle.runtime.geometry import spacing_of

log = logging.getLogger("clinbundle.registry")

CHALLENGER, CHAMPION = "challenger", "champion"
#: on runs and versions trained with `--production` (all labelled data, no validation split)
PRODUCTION_TAG = "clinbundle.production"
#: Fewest held-out volumes `promote` decides on: below it a bootstrap CI says nothing.
MIN_VOLUMES = 3


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
    interval: Interval

    @property
    def mean(self) -> float:
        return self.interval.mean

    @property
    def ci95(self) -> tuple[float, float]:
        return self.interval.low, self.interval.high


class PromotionRefused(ClinbundleError):
    """Too few held-out volumes to decide anything (the CLI exits 2)."""


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
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    contract = model.metadata.metadata["inference_contract"]
    _, images, labels, affines = eval_set
    values = []
    for img, lab, affine in zip(images, labels, affines, strict=True):
        # on each case's own grid, as a clinician measures: the model maps its answer back
        params = {"affine": np.asarray(affine).ravel().tolist(), "output": "labels"}
        pred = model.predict(img[None, None], params=params)[0]
        sp = spacing_of(affine)
        values.append(compute(pred, lab, contract["num_classes"], sp, [metric])[metric])
    return Score(version, metric, values, mean_ci(values))


@dataclass
class Decision:
    promoted: bool
    reason: str
    challenger: Score
    champion: Score | None
    difference: Interval | None
    rule: str = ""

    @property
    def difference_ci95(self) -> tuple[float, float] | None:
        return None if self.difference is None else (self.difference.low, self.difference.high)


#: Which rule decided, recorded as the `promotion_rule` tag.
RULE_MINIMUM = "first_champion_minimum"
RULE_PAIRED_CI = "paired_ci_lower_bound"
RULE_MIN_VOLUMES = "min_volumes"


def decide(
    challenger: Score,
    champion: Score | None,
    minimum: float = 0.5,
    min_improvement: float = 0.0,
) -> Decision:
    """The promotion rule, on scores of the same volumes.

    First champion: its mean must reach `minimum` in the metric's direction. Later: the lower
    bound of the BCa 95% CI of the paired difference (challenger - champion, signed so that
    positive is better) must be above `min_improvement`: a better mean alone can be noise.
    """
    m = get_metric(challenger.metric)
    if champion is None:
        ok = m.sign() * (challenger.mean - minimum) >= 0
        reason = (
            f"first champion: {m.name} {m.format(challenger.mean)} "
            f"{'meets' if ok else 'misses'} the minimum {m.format(minimum)}"
        )
        return Decision(ok, reason, challenger, None, None, RULE_MINIMUM)
    diff = paired_difference_ci(challenger.per_volume, champion.per_volume, m.sign())
    ok = diff.defined and diff.low > min_improvement
    if not diff.defined:
        why = f"no paired CI ({diff.note})"
    elif ok:
        why = f"CI lower bound {diff.low:.4f} > min improvement {min_improvement}"
    else:
        better = diff.mean > min_improvement
        crosses = " (the mean is better, but the CI does not clear the margin)" if better else ""
        why = f"CI lower bound {diff.low:.4f} <= min improvement {min_improvement}{crosses}"
    reason = (
        f"challenger v{challenger.version} {m.name} {m.format(challenger.mean)} vs champion "
        f"v{champion.version} {m.format(champion.mean)}: paired difference 95% CI "
        f"{diff.low:.4f}..{diff.high:.4f} (mean {diff.mean:+.4f}, BCa, n={diff.n}); "
        f"{'promoted' if ok else 'not promoted'}: {why}"
    )
    return Decision(ok, reason, challenger, champion, diff, RULE_PAIRED_CI)


def promote(
    name: str,
    data_dir: Path,
    metric: str = "dice",
    minimum: float = 0.5,
    min_improvement: float = 0.0,
    min_volumes: int = MIN_VOLUMES,
) -> Decision:
    """Score @challenger (and @champion, if any) on the held-out set; move champion on evidence.

    The rule is `decide`'s. Fewer than `min_volumes` held-out volumes: no decision at all
    (`PromotionRefused`, tagged on the challenger). The decision, its numbers and the rule that
    decided are tags on both versions (`promotion_*`), whatever the outcome.
    """
    if metric not in case_metrics():
        raise ModelResolutionError(f"cannot promote on '{metric}'; choose one of {case_metrics()}")
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
    if len(eval_set[0]) < min_volumes:
        why = (
            f"{data_dir} has {len(eval_set[0])} held-out volume(s), fewer than --min-volumes "
            f"{min_volumes}: too few to decide on; add labelled 'test' volumes"
        )
        tags = {"promotion_decision": "refused", "promotion_rule": RULE_MIN_VOLUMES}
        for k, v in (tags | {"promotion_reason": why}).items():
            client.set_model_version_tag(name, challenger.version, k, v)
        raise PromotionRefused(why)
    ch = score_version(name, str(challenger.version), eval_set, metric)
    cp = None if champion is None else score_version(name, str(champion.version), eval_set, metric)
    decision = decide(ch, cp, minimum, min_improvement)
    _record(name, decision, eval_set[0], data_dir)
    if decision.promoted:
        client.set_registered_model_alias(name, CHAMPION, ch.version)
    log.info("promotion of %s v%s: %s", name, ch.version, decision.reason)
    return decision


def _record(name: str, d: Decision, cases: list[str], data_dir: Path) -> None:
    client = MlflowClient()
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    common = {
        "promotion_time": when,
        "promotion_metric": d.challenger.metric,
        "promotion_eval_set": f"{data_dir} ({len(cases)} volumes: {','.join(cases)})"[:4000],
        "promotion_reason": d.reason,
        "promotion_rule": d.rule,
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
        if d.difference is not None:
            diff = d.difference
            tags["promotion_difference_ci95"] = f"{diff.low:.6f},{diff.high:.6f}"
        for k, v in tags.items():
            client.set_model_version_tag(name, score.version, k, v)
