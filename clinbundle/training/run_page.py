"""What a run shows on its MLflow page besides numbers: the data set as a dataset input, a
model summary, the source tree's git state, and one validation case overlaid per epoch.

All of it is MLflow's own (`mlflow.data`, `mlflow.log_image` with a step, which the UI shows
with a step slider), torchinfo and the demo's numpy overlay renderer; nothing here is needed
to train, so a failure to render or log is a warning, never a failed run.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.exceptions import MlflowException

from clinbundle.apps.render import VIEW_AXIS, VIEWS, display_window, render_slice
from clinbundle.runtime.contract import InferenceContract
from clinbundle.training.data import Dataset

log = logging.getLogger("clinbundle.tracking")

#: The key of the overlay images (MLflow's image slider groups them by key).
OVERLAY_KEY = "val_overlay"
#: MLflow keeps dataset digests in a 36-character column; the full hash is an input tag.
DIGEST_CHARS = 16
#: Tries at logging the dataset input when a concurrent run wins the insert (see below).
DATASET_ATTEMPTS = 3


def log_dataset_input(ds: Dataset, num_train: int, num_val: int) -> None:
    """The data folder as the run's `training` input: its path, and the SHA-256 over every
    image and label file (the digest shows its start, the `sha256` input tag all of it)."""
    with warnings.catch_warnings():
        # MLflow registers its local artifact source for both "" and "file" schemes and then
        # warns that a path is ambiguous between the two (identical) classes
        warnings.filterwarnings("ignore", "The specified dataset source can be interpreted")
        source = resolve_dataset_source(str(ds.root))
    dataset = MetaDataset(
        source=source,
        name=Path(ds.root).name,
        digest=ds.sha256[:DIGEST_CHARS],
    )
    tags = {"sha256": ds.sha256, "train_cases": str(num_train), "val_cases": str(num_val)}
    for attempt in range(1, DATASET_ATTEMPTS + 1):
        try:
            mlflow.log_input(dataset, context="training", tags=tags)
            return
        except MlflowException as e:
            if not _lost_insert_race(e) or attempt == DATASET_ATTEMPTS:
                raise
            log.info("dataset %s: another run inserted it first; logging again", dataset.name)


def _lost_insert_race(e: MlflowException) -> bool:
    """MLflow's stores look a dataset up by (experiment, name, digest) and insert it when
    absent, in two statements: runs of one grid starting together on one server both find
    nothing and the later insert breaks the unique key. Retrying finds the committed row.
    The texts are SQLite's, PostgreSQL's and MySQL's for a broken unique key."""
    text = str(e).lower()
    return any(k in text for k in ("unique constraint", "duplicate key", "duplicate entry"))


def model_summary(contract: InferenceContract) -> str:
    """torchinfo's layer table of the contract's network on one roi-sized patch (a fresh copy
    on the CPU: the architecture, shapes and parameter counts, not the weights)."""
    from torchinfo import summary

    from clinbundle.runtime.networks import build_network

    net = build_network(contract.network)
    size = (1, contract.in_channels, *contract.roi_size)
    table = summary(net, input_size=size, depth=4, device="cpu", verbose=0)
    return f"{contract.network.family} {contract.network.kwargs}\n\n{table}\n"


def overlay(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Axial, coronal and sagittal slices side by side (RGB uint8) through the centre of the
    ground truth (the volume's centre when it is empty): prediction filled, truth outlined."""
    fg = np.argwhere(truth > 0)
    centre = fg.mean(0) if len(fg) else np.array(image.shape) / 2
    window = display_window(image)
    tiles = [
        render_slice(image, v, int(centre[VIEW_AXIS[v]]), window, prediction, truth) for v in VIEWS
    ]
    height = max(t.shape[0] for t in tiles)
    tiles = [np.pad(t, ((0, height - t.shape[0]), (0, 4), (0, 0))) for t in tiles]
    return np.concatenate(tiles, axis=1)


class OverlayLogger:
    """Logs the first validation case's overlay each validated epoch (image read once)."""

    def __init__(self, val_pairs: list[dict[str, str]], pred_dir: Path) -> None:
        self.pair = val_pairs[0] if val_pairs else None
        self.pred_dir = pred_dir
        self._volumes: tuple[np.ndarray, np.ndarray] | None = None

    def log(self, epoch: int) -> None:
        if self.pair is None:
            return
        name = Path(self.pair["image"]).name.removesuffix(".gz").removesuffix(".nii")
        case = self.pair.get("case") or name  # the trainer's name of the case's prediction
        pred = self.pred_dir / f"{case}.npz"
        try:
            if self._volumes is None:
                self._volumes = tuple(  # type: ignore[assignment]
                    np.asarray(nib.load(self.pair[k]).dataobj) for k in ("image", "label")
                )
            image, truth = self._volumes  # type: ignore[misc]
            with np.load(pred) as z:
                labels = z["labels"]
            mlflow.log_image(overlay(image, labels, truth), key=OVERLAY_KEY, step=epoch)
        except Exception as e:  # a picture is not worth a failed run
            log.warning("validation overlay of epoch %d not logged: %s", epoch, e)
