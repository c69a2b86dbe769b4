"""Glue between the CLI and the loop: config, tracking and the run folder in the work dir."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from clinbundle.tracking import configure_tracking, experiment_id
from clinbundle.training.callbacks import Callback, TrainState
from clinbundle.training.config import config_to_yaml, load_config
from clinbundle.training.data import read_dataset
from clinbundle.training.tracking_callback import MLflowCallback
from clinbundle.training.trainer import train

log = logging.getLogger("clinbundle.train")


def run_training(
    workdir: Path,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    data_root: Path | None = None,
    extra_callbacks: list[Callback] | None = None,
) -> TrainState:
    """Resolve the config, connect MLflow, train with the MLflow callback; return the state."""
    cfg = load_config(config_path, overrides)
    if data_root is not None:
        cfg.data.root = data_root
    read_dataset(cfg.data.root)  # a missing or empty folder fails before MLflow is touched
    configure_tracking(workdir, cfg.tracking.tracking_uri)
    log.debug("resolved config:\n%s", config_to_yaml(cfg))
    exp = experiment_id(cfg.tracking.experiment, workdir)
    run_name = f"{cfg.model.name}-fold{cfg.data.fold}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir = workdir / "runs" / run_name
    callbacks: list[Callback] = [MLflowCallback(exp, run_name=run_name), *(extra_callbacks or [])]
    return train(cfg, out_dir, callbacks)
