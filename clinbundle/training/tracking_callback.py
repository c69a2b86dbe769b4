"""MLflow as a training callback: params, tags, metrics, every file as it is written, the model.

Parameter prefixes group the run page: `arch_` (network), `data_` (data set and split),
`loss_`, `train_` (optimiser and schedule), `inf_` (inference contract), `sys_` (machine and
the automatic compute decisions).
"""

from __future__ import annotations

import importlib.metadata as md
import logging
import platform
import subprocess
import tempfile
import traceback
from pathlib import Path

import mlflow
import monai
import torch

import clinbundle
from clinbundle.registry import register_challenger
from clinbundle.servable import log_segmentation_model
from clinbundle.training.callbacks import Callback, TrainState
from clinbundle.training.config import config_to_yaml
from clinbundle.training.metrics import DIRECTIONS

log = logging.getLogger("clinbundle.tracking")


def git_commit() -> str:
    """The commit of the clinbundle source tree, or 'unknown' outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(clinbundle.__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def frozen_requirements() -> str:
    dists = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in md.distributions()}, key=str.lower
    )
    return "\n".join(dists) + "\n"


class MLflowCallback(Callback):
    def __init__(self, experiment_id: str, run_name: str | None = None, register: bool = True):
        self.experiment_id = experiment_id
        self.run_name = run_name
        self.register = register
        self.run_id: str | None = None

    def on_train_begin(self, state: TrainState) -> None:
        cfg, comp, ds, c = state.config, state.compute, state.dataset, state.contract
        run = mlflow.start_run(experiment_id=self.experiment_id, run_name=self.run_name)
        self.run_id = run.info.run_id
        state.extra["run_id"] = self.run_id
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
                "train_epochs": cfg.train.epochs,
                "train_lr": cfg.train.lr,
                "train_weight_decay": cfg.train.weight_decay,
                "train_seed": cfg.train.seed,
                "train_selection_metric": cfg.train.selection_metric,
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
            }
        )
        decisions = {k: vars(d) for k, d in comp.decisions.items()}
        mlflow.log_text(config_to_yaml(cfg), "config/config.yaml")
        mlflow.log_dict({"compute_decisions": decisions}, "config/compute_decisions.json")
        mlflow.log_text(c.to_json(), "config/inference_contract.json")
        mlflow.log_dict(
            {
                "python": platform.python_version(),
                "platform": platform.platform(),
                "machine": platform.machine(),
                "torch": torch.__version__,
                "cuda": torch.version.cuda,
                "cuda_devices": [
                    torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())
                ],
                "cpu_threads": torch.get_num_threads(),
            },
            "environment/system_info.json",
        )
        mlflow.log_text(frozen_requirements(), "environment/requirements-frozen.txt")

    def on_artifact(self, state: TrainState, path: Path, artifact_dir: str) -> None:
        mlflow.log_artifact(str(path), artifact_path=artifact_dir or None)

    def on_epoch_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        mlflow.log_metrics(metrics, step=state.epoch)

    def on_train_end(self, state: TrainState) -> None:
        sel = state.config.train.selection_metric
        for name, value in state.best.items():
            mlflow.log_metric(f"best_{name}", value)
            mlflow.set_tag(f"best_{name}_epoch", str(state.best_epoch[name]))
        best = state.out_dir / "checkpoints" / f"best_{sel}.pt"
        if not best.exists():  # 0 epochs, or the selection metric was never finite
            log.warning("no best_%s checkpoint was written; no model is logged", sel)
            mlflow.end_run()
            return
        info = log_segmentation_model(
            best,
            state.contract,
            metadata={
                "run_id": self.run_id,
                "dataset_sha256": state.dataset.sha256,
                "selection_metric": sel,
                "metric_directions": DIRECTIONS,
                "best": state.best,
            },
        )
        state.extra["model_uri"] = info.model_uri
        if self.register:
            version = register_challenger(
                info.model_uri,
                state.config.tracking.model_name,
                run_id=self.run_id,
                tags={"dataset_hash": state.dataset.sha256, "selection_metric": sel}
                | {f"val_{k}": f"{v:.6g}" for k, v in state.best.items()},
            )
            state.extra["model_version"] = version
        mlflow.end_run()

    def on_failure(self, state: TrainState, error: BaseException) -> None:
        if mlflow.active_run() is None:
            return
        interrupted = isinstance(error, KeyboardInterrupt)
        mlflow.set_tags(
            {
                "failure_reason": f"{type(error).__name__}: {error}"[:4000],
                "status_detail": "interrupted" if interrupted else "failed",
            }
        )
        with tempfile.TemporaryDirectory() as tmp:
            p = Path(tmp) / "failure.txt"
            p.write_text("".join(traceback.format_exception(error)))
            mlflow.log_artifact(str(p))
        mlflow.end_run(status="KILLED" if interrupted else "FAILED")
