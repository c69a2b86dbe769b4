"""Where Ray work runs: a cluster by address, else a local Ray started for this command.

Shared by the cohort engine (`clinbundle.cohort.ray_engine`) and training grids
(`clinbundle.training.ray_grid`), so both connect, log and clean up the same way. Ray itself
does the scheduling, retries and data movement; this module only decides where to connect.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from clinbundle.runtime.errors import ClinbundleError

log = logging.getLogger("clinbundle.ray")


class RayUnavailable(ClinbundleError):
    """Ray is not installed, or the cluster at the given address cannot be reached."""


def import_ray():
    """`ray`, or one clear error that says how to install it (it is an optional extra)."""
    try:
        import ray
    except ImportError:
        raise RayUnavailable(
            "--engine ray needs Ray: pip install 'clinbundle[ray]' (ray[data] 2.60)"
        ) from None
    return ray


@contextmanager
def ray_session(
    address: str | None, num_cpus: int | None = None, env: dict[str, str] | None = None
) -> Iterator[dict[str, float]]:
    """Connected to Ray for the block; yields the cluster's resources (CPU, GPU, ...).

    Without `address` a local Ray is started with `num_cpus` (default: every core), no
    dashboard, on the loopback address (Ray may advertise the host's own address instead, as
    it does for any node) and is shut down afterwards. With one, the driver joins that cluster
    and leaves it running. `env` goes to every worker of the job (e.g. MLFLOW_TRACKING_URI),
    because workers on other machines do not inherit this process's environment.
    """
    ray = import_ray()
    runtime_env = {"env_vars": dict(env)} if env else None
    quiet = {"include_dashboard": False, "logging_level": logging.WARNING}
    if address:
        log.info("Ray: joining the cluster at %s", address)
        try:
            ray.init(address=address, runtime_env=runtime_env, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise RayUnavailable(f"cannot join the Ray cluster at {address}: {e}") from None
    else:
        cpus = num_cpus or os.cpu_count() or 1
        log.info("Ray: no --address, starting a local Ray with %d CPU(s)", cpus)
        ray.init(num_cpus=cpus, _node_ip_address="127.0.0.1", runtime_env=runtime_env, **quiet)
    try:
        resources = ray.cluster_resources()
        log.info("Ray cluster resources: %s", _short(resources))
        yield resources
    finally:
        ray.shutdown()


def _short(resources: dict[str, float]) -> dict[str, float]:
    """The resources a user cares about in a log line (not Ray's per-node markers)."""
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}
