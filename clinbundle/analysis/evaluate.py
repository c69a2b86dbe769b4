"""`clinbundle evaluate`: every checkpoint of a training run (or of every run of a grid) on the
held-out set, through the one inference path, with per-volume metrics and BCa 95% CIs.

Checkpoints holding the same weights (best_dice and best_compound saved at the same epoch, or
`last` and a best_* of the final epoch) are predicted and logged once, in one evaluation run whose
`checkpoints` tag names them all: the same predictions would only cost time again.

Each such evaluation run (tag `upstream_training_run_id`) is logged through
MLflow's evaluation API: `mlflow.models.evaluate` over a table of per-case predictions (files),
with one custom metric per entry of the metric registry, so the MLflow UI compares them and
shows the per-case table. The predicted label volumes are artifacts of that run:
`--from-predictions` recomputes every registered metric from them, also one added after
training, without building a network.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import torch
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.metrics import MetricValue
from mlflow.models import make_metric
from mlflow.tracking import MlflowClient

from clinbundle import metric_definitions as M
from clinbundle.analysis.stats import Interval, mean_ci
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import ClinbundleError, DeviceError, ModelResolutionError
from clinbundle.runtime.geometry import spacing_of
from clinbundle.runtime.inference import segment, torch_predictor
from clinbundle.runtime.networks import build_network
from clinbundle.tracking import child_runs

log = logging.getLogger("clinbundle.evaluate")

UPSTREAM_TAG = "upstream_training_run_id"
EVAL_TAG = "clinbundle.evaluation"  # "checkpoint" or "recomputed"
CHECKPOINT_RE = re.compile(r"^checkpoints/(best_\w+|last)\.pt$")


@dataclass
class HeldOut:
    """The held-out cases: their label files (the truth stays on disk) and spacings."""

    root: Path
    cases: list[str]
    images: list[Path]
    labels: list[Path]


@dataclass
class Evaluation:
    """The scores of one set of weights on the held-out cases (in `cases` order) and their CIs;
    `checkpoints` names every checkpoint that holds those weights (best_dice, ..., last)."""

    upstream_run_id: str
    checkpoints: list[str]
    cases: list[str]
    scores: dict[str, list[float]]
    intervals: dict[str, Interval]
    run_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)


def held_out(data_dir: Path) -> HeldOut:
    from clinbundle.registry import load_eval_set  # the one definition of "held-out"

    names = load_eval_set(data_dir)[0]
    meta = json.loads((data_dir / "dataset.json").read_text())
    return HeldOut(
        data_dir,
        names,
        [data_dir / t["image"] for t in meta["test"]],
        [data_dir / t["label"] for t in meta["test"]],
    )


def training_runs(run_id: str) -> list[Run]:
    """The run itself, or every child of a grid's parent run (oldest first)."""
    client = MlflowClient()
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ModelResolutionError(
            f"no MLflow run '{run_id}' in {mlflow.get_tracking_uri()}"
        ) from None
    children = [c for c in child_runs(client, run) if EVAL_TAG not in c.data.tags]
    return children or [run]


def checkpoints_of(run_id: str) -> list[str]:
    paths = [a.path for a in MlflowClient().list_artifacts(run_id, "checkpoints")]
    return sorted(p for p in paths if CHECKPOINT_RE.match(p))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint is data: weights_only, never unpickled code."""
    return torch.load(path, map_location="cpu", weights_only=True)


def weights_key(ckpt: dict) -> tuple[int, int]:
    """(epoch, step) the weights were saved at: equal keys of one run are equal weights."""
    return int(ckpt.get("epoch", -1)), int(ckpt.get("step", 0))


def predict_checkpoint(ckpt: dict, data: HeldOut, device: str, out_dir: Path) -> list[Path]:
    """Label volumes of one checkpoint on each case's own grid, through the one inference path."""
    contract = InferenceContract.model_validate(ckpt["contract"])
    model = build_network(contract.network)
    model.load_state_dict(ckpt["model"])
    predictor = torch_predictor(model.to(device))
    files = []
    for case, image in zip(data.cases, data.images, strict=True):
        img = nib.load(image)
        volume = np.asarray(img.dataobj, dtype=np.float32)[None, None]
        with torch.no_grad():
            labels = segment(
                predictor, volume, contract, affine=img.affine, output="labels", device=device
            )[0]
        out = out_dir / f"{case}.npz"
        np.savez_compressed(out, labels=labels.astype(np.uint8), num_classes=contract.num_classes)
        files.append(out)
    return files


def _table(data: HeldOut, predictions: list[Path]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "case": data.cases,
            "prediction": [str(p) for p in predictions],
            "target": [str(t) for t in data.labels],
        }
    )


def _case_scorer(scores: dict[str, list[float]]):
    """Custom metrics for `mlflow.models.evaluate`: each registered case metric, over the table.

    The label volumes are read once per case; `scores` receives the full per-case values."""
    cache: dict[tuple[str, str], M.Case] = {}

    def case(pred: str, target: str) -> M.Case:
        if (pred, target) not in cache:
            with np.load(pred) as z:
                labels, k = z["labels"], int(z["num_classes"])
            ref = nib.load(target)
            truth = np.asarray(ref.dataobj).astype(np.uint8)
            cache[pred, target] = M.Case(labels, truth, k, spacing_of(ref.affine))
        return cache[pred, target]

    def make(m: M.MetricDef):
        def eval_fn(predictions: pd.Series, targets: pd.Series) -> MetricValue:
            values = [float(m.fn(case(p, t))) for p, t in zip(predictions, targets, strict=True)]
            scores[m.name] = values
            ci = mean_ci(values)
            return MetricValue(
                scores=values,
                aggregate_results={"mean": ci.mean, "ci95_low": ci.low, "ci95_high": ci.high},
            )

        return make_metric(eval_fn=eval_fn, greater_is_better=m.direction == "max", name=m.name)

    return [make(M.get(n)) for n in M.case_metrics()]


def log_evaluation(
    upstream: Run,
    checkpoints: list[str],
    data: HeldOut,
    predictions: list[Path],
    tags: dict[str, str],
) -> Evaluation:
    """One evaluation run: the per-case table through `mlflow.models.evaluate`, the predictions
    as artifacts, the means and CIs as metrics and a JSON summary."""
    scores: dict[str, list[float]] = {}
    up_tags = upstream.data.tags
    run_tags = {
        UPSTREAM_TAG: upstream.info.run_id,
        "checkpoint": checkpoints[0],
        "checkpoints": ",".join(checkpoints),
        "checkpoint_metric": ",".join(c.removeprefix("best_") for c in checkpoints),
        "loss_type": up_tags.get("loss_type", ""),
        "fold_id": up_tags.get("fold_id", ""),
        "eval_data": str(data.root),
        "eval_volumes": str(len(data.cases)),
        **tags,
    }
    name = f"eval-{checkpoints[0]}-{upstream.info.run_name}"
    with mlflow.start_run(
        experiment_id=upstream.info.experiment_id, run_name=name, tags=run_tags
    ) as run:
        mlflow.models.evaluate(
            data=_table(data, predictions),
            predictions="prediction",
            targets="target",
            extra_metrics=_case_scorer(scores),
            evaluators="default",
        )
        for p in predictions:
            mlflow.log_artifact(str(p), "predictions")
        intervals = {k: mean_ci(v) for k, v in scores.items()}
        summary = {
            "cases": data.cases,
            "scores": scores,
            "intervals": {k: vars(v) for k, v in intervals.items()},
        }
        mlflow.log_dict(summary, "evaluation.json")
    return Evaluation(
        upstream.info.run_id, checkpoints, data.cases, scores, intervals, run.info.run_id, run_tags
    )


def evaluate_run(
    run_id: str,
    data_dir: Path | None = None,
    checkpoints: list[str] | None = None,
    device: str = "cpu",
) -> list[Evaluation]:
    """Every `best_*` checkpoint and `last` (or those named) of a run or of a grid's runs."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for and no CUDA device is available")
    out = []
    for run in training_runs(run_id):
        data = held_out(_data_dir(run, data_dir))
        names = [p for p in checkpoints_of(run.info.run_id) if _chosen(p, checkpoints)]
        if not names:
            raise ModelResolutionError(f"run {run.info.run_id} has no checkpoints to evaluate")
        with tempfile.TemporaryDirectory() as tmp:
            groups: dict[tuple[int, int], list[tuple[str, dict]]] = {}
            for art in names:
                local = mlflow.artifacts.download_artifacts(
                    run_id=run.info.run_id, artifact_path=art, dst_path=tmp
                )
                ckpt = load_checkpoint(Path(local))
                groups.setdefault(weights_key(ckpt), []).append((Path(art).stem, ckpt))
            for members in groups.values():
                which = [m[0] for m in members]
                pred_dir = Path(tmp) / "predictions" / which[0]
                pred_dir.mkdir(parents=True)
                preds = predict_checkpoint(members[0][1], data, device, pred_dir)
                ev = log_evaluation(run, which, data, preds, {EVAL_TAG: "checkpoint"})
                log.info("%s %s: %s", run.info.run_name, ",".join(which), _brief(ev))
                out.append(ev)
    return out


def recompute_from_predictions(run_id: str, data_dir: Path | None = None) -> list[Evaluation]:
    """Every registered metric again from the saved predictions of evaluation runs: `run_id` is
    an evaluation run, a training run or a grid (its evaluation runs are found by tag).
    No network is built."""
    out = []
    for ev_run in _evaluation_runs(run_id):
        upstream = MlflowClient().get_run(ev_run.data.tags[UPSTREAM_TAG])
        data = held_out(_data_dir(upstream, data_dir))
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(
                mlflow.artifacts.download_artifacts(
                    run_id=ev_run.info.run_id, artifact_path="predictions", dst_path=tmp
                )
            )
            preds = [local / f"{c}.npz" for c in data.cases]
            missing = [p.name for p in preds if not p.is_file()]
            if missing:
                raise ClinbundleError(
                    f"evaluation run {ev_run.info.run_id} has no predictions for {missing}; "
                    "was it evaluated on another data set? (--data)"
                )
            tags = {EVAL_TAG: "recomputed", "recomputed_from": ev_run.info.run_id}
            which = ev_run.data.tags["checkpoints"].split(",")
            ev = log_evaluation(upstream, which, data, preds, tags)
            log.info("recomputed %s: %s", ev_run.info.run_name, _brief(ev))
            out.append(ev)
    return out


def _evaluation_runs(run_id: str) -> list[Run]:
    client = MlflowClient()
    run = client.get_run(run_id)
    if run.data.tags.get(EVAL_TAG):
        return [run]
    found = []
    for tr in training_runs(run_id):
        found += client.search_runs(
            [tr.info.experiment_id],
            filter_string=f"tags.{UPSTREAM_TAG} = '{tr.info.run_id}' and "
            f"tags.`{EVAL_TAG}` = 'checkpoint'",
            order_by=["attributes.start_time ASC"],
        )
    if not found:
        raise ModelResolutionError(
            f"run {run_id} has no evaluation runs with predictions; run `clinbundle evaluate` first"
        )
    return found


def _data_dir(run: Run, given: Path | None) -> Path:
    if given is not None:
        return given
    root = run.data.params.get("data_root")
    if not root or not Path(root).is_dir():
        raise ClinbundleError(
            f"the data folder of run {run.info.run_id} ({root}) is not here; pass --data DIR"
        )
    return Path(root)


def _chosen(path: str, checkpoints: list[str] | None) -> bool:
    return checkpoints is None or Path(path).stem in checkpoints


def _brief(ev: Evaluation) -> str:
    return ", ".join(f"{k} {M.get(k).format(i.mean)}" for k, i in ev.intervals.items())
