"""The demo's review queue (`clinbundle demo --queue predictions.parquet`).

The flagged cases of a `predict` run, most uncertain first: each opens with its input image and
the labels `predict` stored for it (the prediction under review, read back, never a new run),
its uncertainty and the model version that made it. A review is stored on that model version,
keyed by the table's content hash, exactly as the demo stores any review (`record_review`).

The stored labels are offered as one more runtime ("Stored prediction"), so the page, the
review record and the runtime switch work as they do for a live model; pressing "Run" with it
on a queue case shows the stored labels again, and on anything else says it has none.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from clinbundle.apps import http_io
from clinbundle.apps.demo import Case, DemoRuntime, ModelInfo, _metric_rows, _sha256
from clinbundle.review_table import FlaggedCase, check_unchanged, read_flagged
from clinbundle.runtime.errors import ClinbundleError, InputError

log = logging.getLogger("clinbundle.demo")

QUEUE_RUNTIME = "Stored prediction"
#: A queue case was already segmented by `predict`: allow whole CT volumes, not the upload bound.
QUEUE_MAX_VOXELS = 512**3


def _read(path: Path, what: str, case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        array, affine = http_io.read_volume(path, QUEUE_MAX_VOXELS, "what the queue shows")
    except http_io.BadRequest as e:
        raise InputError(f"case {case_id!r} ({what} {path.name}): {e}") from None
    return array[0, 0], affine


class ReviewQueue:
    """The flagged cases in order, and the stored labels of those opened so far."""

    def __init__(self, cases: list[FlaggedCase]) -> None:
        self.cases = cases
        self._labels: dict[str, np.ndarray] = {}  # image array hash -> stored labels

    def __len__(self) -> int:
        return len(self.cases)

    def open(self, index: int) -> Case:
        """Case `index` with its stored prediction on screen (Case.sha256 = the content hash)."""
        item = self.cases[index]
        check_unchanged(item)
        image, affine = _read(item.input, "input", item.case_id)
        labels, _ = _read(item.output, "stored prediction", item.case_id)
        if labels.shape != image.shape:
            raise InputError(
                f"case {item.case_id!r}: stored prediction {labels.shape} is not on the input's "
                f"grid {image.shape}"
            )
        image = image.astype(np.float32)
        case = Case(item.case_id, image, affine, item.content_hash)
        case.prediction, case.runtime = labels.astype(np.uint8), QUEUE_RUNTIME
        case.origin = {
            "table": str(item.table),
            "output": item.output.name,
            "uncertainty": item.uncertainty,
            "runtime": item.runtime,
            "position": f"{index + 1} of {len(self)}",
        }
        self._labels[_sha256(image)] = case.prediction
        log.info("queue case %d of %d: %s (%s)", index + 1, len(self), item.case_id, item.model)
        return case

    def segment(self, image: np.ndarray, affine: np.ndarray | None) -> np.ndarray:
        labels = self._labels.get(_sha256(image.astype(np.float32)))
        if labels is None:
            raise InputError(
                f"'{QUEUE_RUNTIME}' has labels only for the queue's cases; choose another runtime"
            )
        return labels

    def markdown(self, index: int) -> str:
        item = self.cases[index]
        last = " (the last flagged case)" if index == len(self) - 1 else ""
        return (
            f"**Review queue: case {index + 1} of {len(self)}{last}**: `{item.case_id}`  \n"
            f"uncertainty **{item.uncertainty:.4f}** (mean foreground entropy), predicted by "
            f"**{item.model}** on {item.runtime}"
        )


def _model_info(item: FlaggedCase) -> ModelInfo:
    """The table's model version in the registry: where its reviews are stored."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        version = client.get_model_version(item.model_name, item.model_version)
    except MlflowException as e:
        raise ClinbundleError(
            f"the table's model {item.model} is not in the MLflow registry at "
            f"{client.tracking_uri} ({e.message}); give the --workdir (or MLFLOW_TRACKING_URI) "
            "that `predict` used, so reviews land on that version"
        ) from None
    held_out = {
        k.removeprefix("promotion_"): v
        for k, v in version.tags.items()
        if k.startswith("promotion_")
    }
    return ModelInfo(
        name=item.model_name,
        version=item.model_version,
        run_id=version.run_id,
        uri=f"models:/{item.model_name}/{item.model_version}",
        metrics=_metric_rows({}, held_out),
        parity_markdown=f"The queue shows the labels `clinbundle predict` stored ({item.runtime}, "
        f"table `{item.table}`); no model runs for them here.",
    )


def open_queue(table: Path) -> tuple[ReviewQueue, DemoRuntime]:
    """The queue of a table and its runtime; a bad table or unknown model fails here (exit 2)."""
    queue = ReviewQueue(read_flagged(table))
    first = queue.cases[0]
    description = f"labels stored by `clinbundle predict` ({first.model}, {first.runtime})"
    runtime = DemoRuntime(QUEUE_RUNTIME, queue.segment, description, _model_info(first))
    log.info("review queue: %d flagged cases of %s from %s", len(queue), first.model, table)
    return queue, runtime
