"""MLflow as a training callback: params, tags, metrics, every file as it is written, the model.

Parameter prefixes group the run page: `arch_` (network), `data_` (data set and split),
`loss_`, `train_` (optimiser and schedule), `inf_` (inference contract), `sys_` (machine and
the automatic compute decisions).

Run state is a tag, `clinbundle.status`: `training`, `interrupted` (SIGTERM: `last` saved, run
ended KILLED), `failed` (ended FAILED) or `finished`; `clinbundle.status_reason` says why and
`clinbundle.last_checkpoint` where `last` stands. A resumed run is the same MLflow run, continued:
its params stay, metrics continue at the next epoch, `clinbundle.resumes` counts the resumes.
Metrics, tags and artifacts go through `RunSpool`, which rides out tracking-server outages.
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import os
import platform
import tempfile
import traceback
from pathlib import Path

import mlflow
import monai
import torch
from mlflow.tracking import MlflowClient

import clinbundle
from clinbundle.provenance import git_commit, git_state
from clinbundle.registry import PRODUCTION_TAG, register_challenger
from clinbundle.runtime.errors import Preempted, TrackingError
from clinbundle.servable import log_segmentation_model
from clinbundle.training.callbacks import Callback, TrainState
from clinbundle.training.config import config_to_yaml
from clinbundle.training.metrics import DIRECTIONS
from clinbundle.training.run_page import (
    OverlayLogger,
    log_dataset_input,
    model_summary,
)
from clinbundle.training.spool import RunSpool, configure_http, is_remote, restore_http

log = logging.getLogger("clinbundle.tracking")

STATUS_TAG = "clinbundle.status"
REASON_TAG = "clinbundle.status_reason"
CHECKPOINT_TAG = "clinbundle.last_checkpoint"
RESUMES_TAG = "clinbundle.resumes"
#: How long an interrupted run tries to upload its spool before the process exits (a preempted
#: machine has a short grace period).
PREEMPT_FLUSH_S = 30.0


def frozen_requirements() -> str:
    dists = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in md.distributions()}, key=str.lower
    )
    return "\n".join(dists) + "\n"


def system_info() -> dict:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
    }


def logged_steps(client: MlflowClient, run_id: str, keys: set[str]) -> set[tuple[str, int]]:
    """(key, step) pairs the server already holds for `keys` (used to never log one twice)."""
    out: set[tuple[str, int]] = set()
    for key in sorted(keys):
        out |= {(key, m.step) for m in client.get_metric_history(run_id, key)}
    return out


class MLflowCallback(Callback):
    """Tracks one training in one MLflow run; with `resume_run_id`, continues that run."""

    def __init__(
        self,
        experiment_id: str,
        run_name: str | None = None,
        register: bool = True,
        resume_run_id: str | None = None,
        parent_run_id: str | None = None,
    ):
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.register = register
        self.resume_run_id = resume_run_id
        self.parent_run_id = parent_run_id  # a grid's parent run (clinbundle.training.grid)
        self.run_id: str | None = resume_run_id
        self.spool: RunSpool | None = None
        self._http: dict[str, str | None] = {}
        self.overlays: OverlayLogger | None = None

    def on_train_begin(self, state: TrainState) -> None:
        cfg = state.config
        uri = mlflow.get_tracking_uri()
        if is_remote(uri):
            self._http = configure_http(cfg.tracking.http_timeout_s)
        if cfg.tracking.system_metrics:
            mlflow.set_system_metrics_sampling_interval(cfg.tracking.system_metrics_interval_s)
        self.overlays = OverlayLogger(state.split["val"], state.out_dir / "val_predictions")
        if self.resume_run_id:
            self._resume_begin(state, uri)
        else:
            run = mlflow.start_run(
                experiment_id=self.experiment_id,
                run_name=self.run_name,
                log_system_metrics=cfg.tracking.system_metrics,
                parent_run_id=self.parent_run_id,
                tags={"clinbundle.grid": self.parent_run_id} if self.parent_run_id else None,
            )
            self.run_id = run.info.run_id
            self.spool = RunSpool(
                self.run_id, uri, state.out_dir / "spool", cfg.tracking.outage_limit_s
            )
            self._log_new_run(state)
        state.extra["run_id"] = self.run_id

    def _resume_begin(self, state: TrainState, uri: str) -> None:
        assert self.resume_run_id is not None
        client = MlflowClient()
        run = mlflow.start_run(  # the same run, RUNNING again
            run_id=self.resume_run_id, log_system_metrics=state.config.tracking.system_metrics
        )
        resumes = int(run.data.tags.get(RESUMES_TAG, "0")) + 1
        keys = {k for h in state.history for k in h if k != "epoch"}
        keys |= {f"best_{m}" for m in DIRECTIONS}
        confirmed = logged_steps(client, self.resume_run_id, keys)
        self.spool = RunSpool(
            self.resume_run_id,
            uri,
            state.out_dir / "spool",
            state.config.tracking.outage_limit_s,
            confirmed=confirmed,
        )
        where = state.extra.get("resumed_from", {})
        self.spool.set_tags(
            {
                STATUS_TAG: "training",
                REASON_TAG: f"resumed ({resumes}) from epoch {where.get('epoch')} "
                f"step {where.get('step')}",
                RESUMES_TAG: str(resumes),
                "status_detail": "resumed",
            }
        )
        mlflow.log_dict(system_info(), f"environment/resume-{resumes}/system_info.json")
        # epochs whose metrics did not reach the server before the interruption (e.g. killed
        # between writing `last` and logging) are logged now; those it has are not logged again
        for entry in state.history:
            self.spool.log_metrics(
                {k: v for k, v in entry.items() if k != "epoch"}, step=int(entry["epoch"])
            )
        log.info("continuing MLflow run %s (resume %d)", self.resume_run_id, resumes)

    def _log_new_run(self, state: TrainState) -> None:
        cfg, comp, ds, c = state.config, state.compute, state.dataset, state.contract
        mlflow.log_params(
            {
                "arch_family": c.model_family,
                "arch_filters": cfg.model.filters,
                "arch_num_parameters": state.num_parameters,
                "data_root": str(ds.root),
                "data_sha256": ds.sha256,
                "data_num_train": len(state.split["train"]),
                "data_num_val": len(state.split["val"]),
                "data_num_test": len(ds.test),
                "data_folds": cfg.data.folds,
                "data_fold": cfg.data.fold,
                "data_samples_per_volume": cfg.data.samples_per_volume,
                "data_min_shape": list(ds.min_shape),
                "loss_name": cfg.loss.name,
                "loss_cldice_alpha": cfg.loss.cldice_alpha,
                "loss_cbdice_weight": cfg.loss.cbdice_weight,
                "train_epochs": cfg.train.epochs,
                "train_lr": cfg.train.lr,
                "train_weight_decay": cfg.train.weight_decay,
                "train_seed": cfg.train.seed,
                "train_selection_metric": cfg.train.selection_metric,
                "train_checkpoint_every_epochs": cfg.train.checkpoint_every_epochs,
                "train_checkpoint_every_minutes": cfg.train.checkpoint_every_minutes,
                "train_world_size": int(os.environ.get("WORLD_SIZE", 1)),
                "inf_roi_size": list(c.roi_size),
                "inf_overlap": c.overlap,
                "inf_blend_mode": c.blend_mode,
                "inf_normalization": c.normalization.kind,
                "sys_python": platform.python_version(),
                "sys_platform": platform.platform(),
                "sys_torch": torch.__version__,
                "sys_monai": monai.__version__,
                "sys_mlflow": mlflow.__version__,
                "sys_cuda": torch.version.cuda or "none",
                "sys_cpu_threads": torch.get_num_threads(),
                **{f"sys_{k}": d.value for k, d in comp.decisions.items()},
                **{
                    f"sys_{k}_source": "auto" if d.auto else "user"
                    for k, d in comp.decisions.items()
                },
            }
        )
        mlflow.set_tags(
            {
                "loss_type": cfg.loss.name,
                "fold_id": str(cfg.data.fold),
                "model_family": c.model_family,
                "git_commit": git_commit(),
                "dataset_hash": ds.sha256,
                "clinbundle_version": clinbundle.__version__,
                **git_state(),
                STATUS_TAG: "training",
                **({PRODUCTION_TAG: "true"} if cfg.train.production else {}),
            }
        )
        log_dataset_input(ds, len(state.split["train"]), len(state.split["val"]))
        decisions = {k: vars(d) for k, d in comp.decisions.items()}
        mlflow.log_text(config_to_yaml(cfg), "config/config.yaml")
        mlflow.log_dict({"compute_decisions": decisions}, "config/compute_decisions.json")
        mlflow.log_text(c.to_json(), "config/inference_contract.json")
        mlflow.log_dict(system_info(), "environment/system_info.json")
        mlflow.log_text(frozen_requirements(), "environment/requirements-frozen.txt")
        mlflow.log_text(model_summary(c), "model_summary.txt")

    def on_artifact(self, state: TrainState, path: Path, artifact_dir: str) -> None:
        assert self.spool is not None
        self.spool.log_artifact(path, artifact_dir)
        if path.name == "last.pt" and "last_checkpoint" in state.extra:
            at = state.extra["last_checkpoint"]
            self.spool.set_tags({CHECKPOINT_TAG: f"epoch={at['epoch']} step={at['step']}"})

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        assert self.spool is not None
        self.spool.log_metrics(metrics, step=state.epoch)
        if "dice" in metrics and self.overlays and self.spool.outage_since is None:
            self.overlays.log(state.epoch)  # validated this epoch: its predictions are on disk

    def on_train_end(self, state: TrainState) -> None:
        assert self.spool is not None and self.run_id is not None
        spool = self.spool
        spool.flush()
        sel = state.config.train.selection_metric
        final_step = state.config.train.epochs
        spool.log_metrics({f"best_{k}": v for k, v in state.best.items()}, step=final_step)
        spool.set_tags({f"best_{k}_epoch": str(e) for k, e in state.best_epoch.items()})
        spool.flush()
        production = state.config.train.production  # no validation: the model is `last`
        best = state.out_dir / "checkpoints" / ("last.pt" if production else f"best_{sel}.pt")
        if not best.exists():  # 0 epochs, or the selection metric was never finite
            log.warning("no %s checkpoint was written; no model is logged", best.stem)
            self._end(state, "FINISHED", {STATUS_TAG: "finished"})
            return
        name = state.config.tracking.model_name
        existing = self._registered_version(name) if self.resume_run_id else None
        if existing is not None:  # an earlier attempt of this run got as far as registering
            log.info("run %s already registered %s version %s", self.run_id, name, existing)
            state.extra["model_version"] = existing
        else:
            info = spool.call(
                lambda: log_segmentation_model(
                    best,
                    state.contract,
                    metadata={
                        "run_id": self.run_id,
                        "dataset_sha256": state.dataset.sha256,
                        "selection_metric": sel,
                        "checkpoint": f"checkpoints/{best.name}",
                        "metric_directions": DIRECTIONS,
                        "best": state.best,
                    },
                ),
                "the model",
            )
            state.extra["model_uri"] = info.model_uri
            if self.register:
                state.extra["model_version"] = spool.call(
                    lambda: (
                        self._registered_version(name)
                        or register_challenger(
                            info.model_uri,
                            name,
                            run_id=self.run_id,
                            tags={"dataset_hash": state.dataset.sha256, "selection_metric": sel}
                            | {f"val_{k}": f"{v:.6g}" for k, v in state.best.items()}
                            | ({PRODUCTION_TAG: "true"} if production else {}),
                        )
                    ),
                    "the model registration",
                )
        self._end(state, "FINISHED", {STATUS_TAG: "finished", REASON_TAG: "training completed"})

    def _registered_version(self, name: str) -> str | None:
        """The version of `name` this run already registered, if any (registration is once)."""
        for mv in MlflowClient().search_model_versions(f"name='{name}'"):
            if mv.run_id == self.run_id:
                return str(mv.version)
        return None

    def _end(self, state: TrainState, status: str, tags: dict[str, str]) -> None:
        assert self.spool is not None
        self.spool.set_tags(tags)
        self.spool.flush()
        run_id = self.run_id
        # the client call is the one that can be repeated; fluent end_run forgets the run at once
        self.spool.call(lambda: MlflowClient().set_terminated(run_id, status), "the end of the run")
        try:
            mlflow.end_run(status=status)  # ends it again (same status) and forgets it
        except Exception as e:
            log.warning("run %s is %s; forgetting it locally failed: %s", run_id, status, e)
        restore_http(self._http)

    def on_failure(self, state: TrainState, error: BaseException) -> None:
        if mlflow.active_run() is None or self.spool is None:
            restore_http(self._http)
            if mlflow.active_run() is not None:  # failed while the run was being set up
                mlflow.end_run(status="FAILED")
            return
        spool = self.spool
        preempted = isinstance(error, Preempted)
        interrupted = preempted or isinstance(error, KeyboardInterrupt)
        status = "KILLED" if interrupted else "FAILED"
        reason = f"{type(error).__name__}: {error}"[:4000]
        gave_up = isinstance(error, TrackingError) and spool.outage_since is not None
        try:
            spool.set_tags(
                {
                    "failure_reason": reason,
                    "status_detail": "interrupted" if interrupted else "failed",
                    STATUS_TAG: "interrupted" if interrupted else "failed",
                    REASON_TAG: error.reason if isinstance(error, Preempted) else reason,
                }
            )
            if not preempted:
                with tempfile.TemporaryDirectory() as tmp:
                    p = Path(tmp) / "failure.txt"
                    p.write_text("".join(traceback.format_exception(error)))
                    spool.log_artifact(p, "")
            if not gave_up:
                # a preempted machine has seconds, not minutes: `last` must be up by then
                spool.flush(limit_s=PREEMPT_FLUSH_S if interrupted else None)
        except TrackingError as e:
            log.error("%s; `last` and the rest stay in %s", e, state.out_dir)
        finally:
            try:  # still with MLflow's retries turned down: a dead server fails fast
                mlflow.end_run(status=status)
            except Exception as e:  # the server is gone; the run stays RUNNING there
                log.error("could not mark run %s %s: %s", self.run_id, status, e)
            restore_http(self._http)
