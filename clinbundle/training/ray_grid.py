"""A grid's trials as Ray tasks: `clinbundle train --folds all --engine ray [--address ADDR]`.

Each trial runs `grid.run_trial` (the very function the sequential grid runs) in a Ray task on
whichever node has room, as its own MLflow child run of the grid's parent. Workers on other
machines cannot see a sqlite file or a local folder, so a remote tracking server (http/https)
is required and probed before anything starts; its address reaches every worker through the
job's environment.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from clinbundle.ray_cluster import import_ray, ray_session
from clinbundle.runtime.errors import ConfigError

if TYPE_CHECKING:
    from clinbundle.training.grid import Trial

log = logging.getLogger("clinbundle.grid")


@dataclass(frozen=True)
class TrialResources:
    """What one trial asks Ray for; `gpus=None` decides from the cluster and the device."""

    cpus: float = 1.0
    gpus: float | None = None


def remote_tracking_uri(configured: str | None) -> str:
    """The http(s) tracking server every worker logs to, or a ConfigError (exit 2)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or ""
    if not uri.startswith(("http://", "https://")):
        shown = uri or "sqlite in the work dir (the default)"
        raise ConfigError(
            f"--engine ray needs a remote MLflow tracking server that every worker can reach; "
            f"the tracking URI is {shown}. Start one (`mlflow server --host HOST --port 5000`) "
            "and pass --tracking-uri http://HOST:5000 (or set MLFLOW_TRACKING_URI)"
        )
    return uri


def trial_gpus(resources: TrialResources, device: str, cluster: dict[str, float]) -> float:
    """GPUs per trial: as asked, else 1 when the cluster has GPUs and the device allows them."""
    have = cluster.get("GPU", 0.0)
    if resources.gpus is not None:
        gpus, why = resources.gpus, "as asked"
    elif device == "cpu":
        gpus, why = 0.0, "compute.device=cpu"
    else:
        gpus, why = (1.0, f"the cluster has {have:g} GPU(s)") if have else (0.0, "no GPU")
    if device == "cuda" and not gpus:
        raise ConfigError(
            f"compute.device=cuda but the Ray cluster has {have:g} GPU(s) for its trials"
        )
    if gpus > have:
        raise ConfigError(f"each trial asks for {gpus:g} GPU(s); the cluster has {have:g}")
    log.info("grid on Ray: %g GPU(s) per trial (%s)", gpus, why)
    return gpus


def run_trials_on_ray(
    workdir: Path,
    trials: list[Trial],
    parent_run_id: str,
    *,
    address: str | None,
    tracking_uri: str,
    device: str,
    resources: TrialResources,
    on_result: Callable[[dict], None],
) -> list[dict]:
    """Every trial as a Ray task; `on_result` hears each result as it lands; results in plan
    order. A task whose worker dies is retried once by Ray (a new child run; the dead one stays
    unfinished on the server)."""
    from clinbundle.training.grid import run_trial

    ray = import_ray()
    env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    with ray_session(address, env=env) as cluster:
        gpus = trial_gpus(resources, device, cluster)
        task = ray.remote(run_trial).options(
            num_cpus=resources.cpus, num_gpus=gpus, max_retries=1, name="clinbundle-trial"
        )
        log.info("grid on Ray: %d trial(s), %g CPU(s) each", len(trials), resources.cpus)
        # a worker's cwd is not ours: the config file travels as an absolute path
        here = [replace(t, config_path=t.config_path and t.config_path.resolve()) for t in trials]
        pending = {task.remote(workdir, t, parent_run_id): i for i, t in enumerate(here)}
        results: dict[int, dict] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(done[0])
            results[i] = ray.get(done[0])
            log.info("grid trial %s finished (%d/%d)", trials[i].name, len(results), len(trials))
            on_result(results[i])
    return [results[i] for i in range(len(trials))]
