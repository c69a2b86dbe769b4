"""`clinbundle train --resume RUN_ID|latest`: find the run, fetch its checkpoints, rebuild its config.

Everything comes from the tracking server, so a resume works on any machine with a fresh work
dir: `last` (and the best checkpoints it refers to) are downloaded, the config is the one saved
in `last`, and training continues the same MLflow run.
"""

from __future__ import annotations

import logging
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from clinbundle.runtime.errors import ConfigError, ResumeError
from clinbundle.training.config import Config, apply_override

log = logging.getLogger("clinbundle.train")

#: Keys `--set` may change on resume: where things are and how often to save, never what is
#: trained (that would make the continued run a different training than its first part).
RESUME_OVERRIDABLE = (
    "data.root",
    "data.num_workers",
    "compute.device",
    "compute.cache_rate",
    "train.checkpoint_every_epochs",
    "train.checkpoint_every_minutes",
    "tracking.tracking_uri",
    "tracking.experiment",
    "tracking.outage_limit_s",
    "tracking.http_timeout_s",
)

#: Runs in these states may be resumed; RUNNING included because a SIGKILLed or powered-off
#: machine never gets to end its run.
RESUMABLE_STATUSES = ("KILLED", "FAILED", "RUNNING")


@dataclass
class Resumed:
    run_id: str
    run_name: str
    config: Config
    checkpoint: dict[str, Any]


def _has_last(client: MlflowClient, run_id: str) -> bool:
    try:
        return any(
            f.path == "checkpoints/last.pt" for f in client.list_artifacts(run_id, "checkpoints")
        )
    except MlflowException:
        return False


def find_run(client: MlflowClient, ref: str, experiment: str, uri: str) -> Run:
    """The run `ref` names (an id, or `latest`: the newest unfinished run that has `last`)."""
    if ref != "latest":
        try:
            run = client.get_run(ref)
        except MlflowException:
            raise ResumeError(f"no MLflow run '{ref}' at {uri}") from None
        if run.info.status == "FINISHED" or run.data.tags.get("clinbundle.status") == "finished":
            raise ResumeError(f"run {ref} finished; there is nothing to resume")
        if not _has_last(client, ref):
            raise ResumeError(
                f"run {ref} has no checkpoints/last.pt to resume from (it stopped before its "
                "first checkpoint; train.checkpoint_every_epochs sets how often one is written)"
            )
        return run
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ResumeError(f"--resume latest: no experiment '{experiment}' at {uri}")
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`clinbundle.status` != 'finished'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    for run in runs:
        if run.info.status not in RESUMABLE_STATUSES:
            continue
        if _has_last(client, run.info.run_id):
            log.info("--resume latest: run %s (%s)", run.info.run_id, run.info.status)
            return run
    raise ResumeError(
        f"--resume latest: no interrupted, killed or failed run with a `last` checkpoint in "
        f"experiment '{experiment}' at {uri}"
    )


def fetch_checkpoints(client: MlflowClient, run_id: str, ckpt_dir: Path) -> dict[str, Any]:
    """Download `last.pt` and the best checkpoints that belong to it into `ckpt_dir`.

    A best_* file newer than `last` (written by epochs that are about to be redone) is skipped:
    the redone epochs write it again.
    """
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, "checkpoints", tmp))
        last = load_checkpoint(local / "last.pt", f"run {run_id}: checkpoints/last.pt")
        shutil.copyfile(local / "last.pt", ckpt_dir / "last.pt")
        for f in sorted(local.glob("best_*.pt")):
            metric = f.stem.removeprefix("best_")
            best = load_checkpoint(f, f"run {run_id}: checkpoints/{f.name}")
            if best.get("epoch") == last.get("best_epoch", {}).get(metric):
                shutil.copyfile(f, ckpt_dir / f.name)
            else:
                log.info("skipping %s (epoch %s): newer than `last`, redone", f.name, best["epoch"])
    return last


def load_checkpoint(path: Path, what: str) -> dict[str, Any]:
    """torch.load with weights_only=True: a checkpoint is data (tensors, plain types).

    It comes from a tracking server that others can write to; a full unpickle would run
    whatever code the file names, so anything beyond data is refused (ResumeError, exit 2).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ResumeError(
            f"{what} holds more than tensors and plain data, so it is refused (loading it "
            f"would run code from the file; only weights_only checkpoints are resumed): {first}"
        ) from None
    except Exception as e:
        raise ResumeError(f"{what} cannot be read ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise ResumeError(f"{what} is not a clinbundle checkpoint (a {type(obj).__name__})")
    return obj


def resume_config(saved: dict[str, Any], overrides: list[str]) -> Config:
    """The run's own config, with only the `RESUME_OVERRIDABLE` keys changed (each logged)."""
    tree = yaml.safe_load(yaml.safe_dump(saved))
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key not in RESUME_OVERRIDABLE:
            raise ConfigError(
                f"--set {key} cannot change when resuming: the run continues with its own config. "
                f"Keys that may change: {', '.join(RESUME_OVERRIDABLE)}"
            )
        apply_override(tree, item)
        log.info("resume: %s (overridden)", item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(f"invalid resume override: {e}") from None


def resolve_resume(
    ref: str, experiment: str, uri: str, overrides: list[str], runs_dir: Path
) -> Resumed:
    """Find the run, download its checkpoints into RUNS_DIR/RUN_ID/checkpoints (replacing what
    an earlier attempt left there), rebuild its config; raises ResumeError."""
    client = MlflowClient()
    run = find_run(client, ref, experiment, uri)
    run_id = run.info.run_id
    ckpt_dir = runs_dir / run_id / "checkpoints"
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    if run.info.status == "RUNNING":
        log.warning(
            "run %s is still marked RUNNING: its machine stopped without ending it (SIGKILL, "
            "lost instance), or it is still training somewhere; continuing it here",
            run_id,
        )
    last = fetch_checkpoints(client, run_id, ckpt_dir)
    cfg = resume_config(last["config"], overrides)
    # the step size and patch of the interrupted run are kept even if `auto` would now choose
    # differently on this machine: the continued run must be the same training
    for key in ("batch_size", "patch_size"):
        value = last.get("compute", {}).get(key)
        current = getattr(cfg.compute, key)
        if value is not None and (list(current) if key == "patch_size" else current) != value:
            log.info("resume: compute.%s = %s (as in the interrupted run)", key, value)
            setattr(cfg.compute, key, tuple(value) if key == "patch_size" else value)
    at = f"epoch {last['epoch'] + 1} step {last['step']}" if last.get("step") else None
    log.info(
        "resuming run %s from %s",
        run_id,
        at or f"the end of epoch {last['epoch']}",
    )
    return Resumed(run_id, run.info.run_name or run_id, cfg, last)
