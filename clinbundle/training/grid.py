"""A grid of trainings (losses x folds, or any swept keys) as one parent MLflow run.

`clinbundle train --folds all --set loss.name=dice_ce,cbdice_cldice` trains every combination,
one after the other. The parent run holds the grid (its keys, the trials, the split file); each
trial is an ordinary training in a child run that registers its model as today. A trial is a
function of its config (file + overrides) alone, so a scheduler can run the same `Trial`s
anywhere: `ray_grid` runs each as a Ray task (`--engine ray`).
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from clinbundle.runtime.errors import ConfigError
from clinbundle.tracking import configure_tracking, experiment_id
from clinbundle.training.config import Config, load_config
from clinbundle.training.data import kfold_split, read_dataset
from clinbundle.training.losses import LOSSES
from clinbundle.training.ray_grid import TrialResources, remote_tracking_uri, run_trials_on_ray

log = logging.getLogger("clinbundle.grid")

GRID_TAG = "clinbundle.grid"  # on the parent ("parent") and on each trial (the parent's id)


def split_values(raw: str) -> list[str]:
    """`a,b` -> [a, b]; commas inside brackets do not split (`[8,16],[16,32]` is two values)."""
    out, depth, cur = [], 0, ""
    for ch in raw:
        depth += (ch in "[{(") - (ch in "]})")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    return [v.strip() for v in [*out, cur]]


def sweeps(overrides: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Fixed overrides and swept keys (a value with top-level commas) of `--set` items."""
    fixed, swept = [], {}
    for item in overrides:
        key, _, raw = item.partition("=")
        values = split_values(raw)
        if len(values) > 1:
            if len(set(values)) != len(values):
                raise ConfigError(f"--set {item}: a swept value is repeated")
            if key in swept:
                raise ConfigError(f"--set {key} is swept twice; give its values once: {key}=a,b")
            swept[key.strip()] = values
        else:
            fixed.append(item)
    return fixed, swept


def parse_folds(text: str, folds: int) -> list[int]:
    """`all` -> 0..folds-1; `0,2` -> [0, 2]; anything else is a ConfigError."""
    if text == "all":
        return list(range(folds))
    try:
        chosen = [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--folds takes 'all' or fold numbers like 0,1; got '{text}'") from None
    bad = [f for f in chosen if not 0 <= f < folds]
    if bad or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--folds {text}: folds must be distinct and in 0..{folds - 1}")
    return chosen


@dataclass(frozen=True)
class RayGrid:
    """Run the trials on Ray: a cluster's address (None: a local Ray) and each trial's share."""

    address: str | None = None
    resources: TrialResources = field(default_factory=TrialResources)


@dataclass(frozen=True)
class Trial:
    """One training of the grid: the config file and overrides that define it, nothing else."""

    name: str
    config_path: Path | None
    overrides: tuple[str, ...]
    values: dict[str, str] = field(default_factory=dict)


def plan(
    config_path: Path | None, overrides: list[str], folds: str | None
) -> tuple[Config, list[Trial], dict[str, list[str]]]:
    """The grid's trials: swept `--set` values crossed with the folds (if given)."""
    fixed, swept = sweeps(overrides)
    base = load_config(config_path, fixed)
    if folds is not None:
        swept["data.fold"] = [str(f) for f in parse_folds(folds, base.data.folds)]
    if not swept:
        raise ConfigError("a grid needs --folds or a --set key with several values (a,b)")
    for key, values in swept.items():  # every value must make a valid config on its own
        for v in values:
            cfg = load_config(config_path, [*fixed, f"{key}={v}"])
            if cfg.loss.name not in LOSSES:  # fail now, not after the trials before it
                raise ConfigError(f"unknown loss '{cfg.loss.name}'; choose one of {list(LOSSES)}")
    keys = list(swept)
    trials = []
    for combo in itertools.product(*(swept[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        name = "-".join(f"{_label(k)}={v}" for k, v in values.items())
        extra = tuple(f"{k}={v}" for k, v in values.items())
        trials.append(Trial(name, config_path, (*fixed, *extra), values))
    return base, trials, swept


def _label(key: str) -> str:
    """`data.fold` -> fold, `loss.name` -> loss: short trial names."""
    parts = key.split(".")
    return parts[-2] if parts[-1] == "name" and len(parts) > 1 else parts[-1]


def split_file(cfg: Config) -> dict:
    """Which cases each fold trains and validates on (the held-out 'test' set is never in it)."""
    ds = read_dataset(cfg.data.root)
    out = {"folds": cfg.data.folds, "seed": cfg.train.seed, "test": [t["case"] for t in ds.test]}
    for f in range(cfg.data.folds):
        s = kfold_split(ds.training, cfg.data.folds, f, cfg.train.seed)
        out[f"fold_{f}"] = {k: [it["case"] for it in v] for k, v in s.items()}
    return out


def run_trial(workdir: Path, trial: Trial, parent_run_id: str | None) -> dict:
    """Train one trial in a child run of `parent_run_id`; its run id and model version."""
    from clinbundle.training.run import run_training

    state = run_training(
        workdir, trial.config_path, list(trial.overrides), parent_run_id=parent_run_id
    )
    return {
        "trial": trial.name,
        "values": trial.values,
        "run_id": state.extra.get("run_id"),
        "model_version": state.extra.get("model_version"),
        "best": state.best,
    }


def run_grid(
    workdir: Path,
    config_path: Path | None,
    overrides: list[str],
    folds: str | None,
    ray: RayGrid | None = None,
) -> tuple[str, list[dict]]:
    """Every trial of the grid under one parent run; (parent run id, results).

    Sequentially in this process, or with `ray` each trial a Ray task (`ray_grid`), which needs
    a remote tracking server: checked before the parent run exists.
    """
    base, trials, swept = plan(config_path, overrides, folds)
    uri = base.tracking.tracking_uri
    if ray is not None:
        uri = remote_tracking_uri(uri)
    uri = configure_tracking(workdir, uri)
    exp = experiment_id(base.tracking.experiment, workdir)
    client = MlflowClient()
    name = f"grid-{time.strftime('%Y%m%d-%H%M%S')}"
    parent = client.create_run(exp, run_name=name, tags={GRID_TAG: "parent"}).info.run_id
    log.info("grid %s: %d trial(s) over %s", parent, len(trials), swept)
    try:
        client.log_dict(parent, {k: v for k, v in swept.items()}, "grid/keys.json")
        client.log_dict(parent, split_file(base), "grid/split.json")
        for k, v in swept.items():
            client.log_param(parent, f"grid_{k}", ",".join(v))
        results: list[dict] = []

        def landed(result: dict) -> None:
            results.append(result)
            client.log_dict(parent, results, "grid/trials.json")

        if ray is not None:
            client.set_tag(parent, "engine", "ray")
            results = run_trials_on_ray(
                workdir,
                trials,
                parent,
                address=ray.address,
                tracking_uri=uri,
                device=base.compute.device,
                resources=ray.resources,
                on_result=landed,
            )
            client.log_dict(parent, results, "grid/trials.json")  # again, in plan order
        else:
            for i, trial in enumerate(trials, 1):
                log.info("grid trial %d/%d: %s", i, len(trials), trial.name)
                landed(run_trial(workdir, trial, parent))
    except BaseException:
        client.set_terminated(parent, "FAILED")
        raise
    client.set_tag(parent, "clinbundle.status", "finished")
    client.set_terminated(parent, "FINISHED")
    return parent, results


def grid_trials(parent_run_id: str) -> list[dict]:
    """The trials a grid recorded (for evaluate and compare)."""
    path = mlflow.artifacts.download_artifacts(
        run_id=parent_run_id, artifact_path="grid/trials.json"
    )
    return json.loads(Path(path).read_text())
