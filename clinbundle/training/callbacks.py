"""Training callbacks: tracking, progress and anything else hook in here, not into the loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clinbundle.runtime.contract import InferenceContract
    from clinbundle.training.compute import Compute
    from clinbundle.training.config import Config
    from clinbundle.training.data import Dataset


@dataclass
class TrainState:
    """What callbacks may read. The loop owns it; callbacks must not change training."""

    config: Config
    contract: InferenceContract
    dataset: Dataset
    compute: Compute
    split: dict[str, list[dict[str, str]]]
    out_dir: Path
    num_parameters: int = 0
    epoch: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, float] = field(default_factory=dict)
    best_epoch: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """No-op base class; override what you need."""

    def on_train_begin(self, state: TrainState) -> None: ...

    def on_artifact(self, state: TrainState, path: Path, artifact_dir: str) -> None:
        """A file was written (checkpoint, history, predictions, split)."""

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_train_end(self, state: TrainState) -> None: ...

    def on_failure(self, state: TrainState, error: BaseException) -> None: ...


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]) -> None:
        self.callbacks = callbacks

    def on_train_begin(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_train_begin(state)

    def on_artifact(self, state: TrainState, path: Path, artifact_dir: str) -> None:
        for c in self.callbacks:
            c.on_artifact(state, path, artifact_dir)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        for c in self.callbacks:
            c.on_epoch_end(state, metrics)

    def on_train_end(self, state: TrainState) -> None:
        for c in self.callbacks:
            c.on_train_end(state)

    def on_failure(self, state: TrainState, error: BaseException) -> None:
        for c in self.callbacks:
            with contextlib.suppress(Exception):  # must not hide the original error
                c.on_failure(state, error)
