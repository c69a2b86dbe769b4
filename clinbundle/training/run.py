"""Glue between the CLI and the loop: config, tracking, resume and the run folder in the work dir.

Under torchrun every rank comes through here; only rank 0 touches MLflow (configures it, finds a
run to resume, downloads `last`) and broadcasts what the others need: the config, the run name
and the checkpoint.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from clinbundle.runtime.errors import ResumeError
from clinbundle.tracking import configure_tracking, experiment_id
from clinbundle.training.callbacks import Callback, TrainState
from clinbundle.training.config import Config, config_to_yaml, load_config
from clinbundle.training.data import read_dataset
from clinbundle.training.distributed import (
    broadcast_object,
    init_distributed,
    shutdown_distributed,
)
from clinbundle.training.tracking_callback import MLflowCallback
from clinbundle.training.trainer import train

log = logging.getLogger("clinbundle.train")


def _prepare(
    workdir: Path,
    config_path: Path | None,
    overrides: list[str],
    data_root: Path | None,
    resume: str | None,
) -> tuple[Config, str, str, dict[str, Any] | None, str | None]:
    """Rank 0: config, experiment, run name, resume checkpoint and the run id it continues."""
    if resume is not None:
        if config_path is not None:
            raise ResumeError(
                "--resume takes the config from the run; drop --config (--set may change "
                "where data and tracking live and how often to checkpoint)"
            )
        # only the tracking location (and the experiment `latest` looks in) come from here
        where = load_config(None, [o for o in overrides if o.startswith("tracking.")])
        uri = configure_tracking(workdir, where.tracking.tracking_uri)
        from clinbundle.training.resume import resolve_resume

        extra = [f"data.root={data_root}"] if data_root is not None else []
        r = resolve_resume(
            resume,
            where.tracking.experiment,
            uri,
            overrides + extra,
            workdir / "runs",
        )
        try:
            read_dataset(r.config.data.root)
        except Exception as e:
            raise ResumeError(
                f"the run's data folder is not usable here ({str(e).splitlines()[-1]}); pass "
                "--data DIR with the same data (its content hash is checked)"
            ) from None
        return r.config, "", r.run_name, r.checkpoint, r.run_id
    cfg = load_config(config_path, overrides)
    if data_root is not None:
        cfg.data.root = data_root
    read_dataset(cfg.data.root)  # a missing or empty folder fails before MLflow is touched
    configure_tracking(workdir, cfg.tracking.tracking_uri)
    log.debug("resolved config:\n%s", config_to_yaml(cfg))
    exp = experiment_id(cfg.tracking.experiment, workdir)
    run_name = (
        f"{cfg.model.name}-{cfg.loss.name}-fold{cfg.data.fold}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return cfg, exp, run_name, None, None


def run_training(
    workdir: Path,
    config_path: Path | None = None,
    overrides: list[str] | None = None,
    data_root: Path | None = None,
    extra_callbacks: list[Callback] | None = None,
    resume: str | None = None,
    parent_run_id: str | None = None,
) -> TrainState:
    """Resolve the config, connect MLflow, train with the MLflow callback; return the state.

    `parent_run_id` makes the run a child of a grid's parent run (`clinbundle.training.grid`).

    `resume` is a run id or `latest`: that run's `last` is downloaded and the same MLflow run is
    continued (its own config; `overrides` may only change the keys in RESUME_OVERRIDABLE).
    """
    info = init_distributed()
    try:
        prepared: Any = None
        error: BaseException | None = None
        if info.is_main:
            try:
                prepared = _prepare(workdir, config_path, list(overrides or []), data_root, resume)
            except BaseException as e:  # the other ranks must hear of it, not wait forever
                error = e
        ok = broadcast_object(error is None, info)
        if error is not None:
            raise error
        if not ok:
            raise SystemExit(2)  # rank 0 reported the error
        cfg, exp, run_name, checkpoint, run_id = broadcast_object(prepared, info)
        folder = run_id if run_id else run_name
        out_dir = workdir / "runs" / folder
        callbacks: list[Callback] = []
        if info.is_main:
            callbacks = [
                MLflowCallback(
                    exp, run_name=run_name, resume_run_id=run_id, parent_run_id=parent_run_id
                ),
                *(extra_callbacks or []),
            ]
        return train(cfg, out_dir, callbacks, resume=checkpoint)
    finally:
        shutdown_distributed()
