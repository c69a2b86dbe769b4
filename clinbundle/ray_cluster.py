"""Where Ray work runs: a cluster by address, else a local Ray started for this command.

Shared by the cohort engine (`clinbundle.cohort.ray_engine`) and training grids
(`clinbundle.training.ray_grid`), so both connect, log and clean up the same way. Ray itself
does the scheduling, retries and data movement; this module only decides where to connect.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil

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
        probe(address)
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


def probe(address: str, timeout: float = 10.0) -> None:
    """A HOST:PORT that does not answer is one clear error now: `ray.init` itself retries a
    dead address for minutes."""
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise RayUnavailable(f"--address {address!r}: give the head node as HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayUnavailable(
            f"no Ray cluster answers at {address} ({e}); start one (`ray start --head`) or "
            "drop --address to run on a local Ray"
        ) from None


def _short(resources: dict[str, float]) -> dict[str, float]:
    """The resources a user cares about in a log line (not Ray's per-node markers)."""
    return {k: v for k, v in resources.items() if k in ("CPU", "GPU", "memory")}


class LoopbackCluster:
    """A real two-node Ray cluster on this machine: `ray start --head` and one
    `ray start --address`, 1 CPU each, with their own temp dir and auth token. The tests and
    `benchmarks/cohort.py` run on it; `env` is what a driver process needs to join it.

    Stopped by process id (every process whose command line names this cluster's temp dir, and
    their children), never with `ray stop`, which would stop every Ray of the user's machine.
    """

    def __init__(self, root: Path, cpus_per_node: int = 1) -> None:
        from clinbundle.packaging.bento import free_port

        self.cpus = cpus_per_node
        # short, in the system temp: Ray's socket paths under it must fit in 107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="cb-ray-"))
        self.port, self.worker_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        token = Path(root) / "ray-token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        self.env = os.environ | {
            "RAY_TMPDIR": str(self.tmp),
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            # a killed node is declared dead in ~2 s, not 15
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "3",
        }

    def _start(self, *args: str) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", str(self.cpus)]
        common += ["--disable-usage-stats", "--object-store-memory", str(200 * 2**20)]
        ray = str(Path(sys.executable).parent / "ray")
        r = subprocess.run(
            [ray, "start", *args, *common], env=self.env, capture_output=True, text=True,
            timeout=300,
        )  # fmt: skip
        if r.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}")

    def start(self) -> None:
        head = ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        self._start(*head, "--temp-dir", str(self.tmp))
        self._start("--address", self.address, "--node-manager-port", str(self.worker_port))
        log.info("Ray cluster of 2 nodes at %s (temp %s)", self.address, self.tmp)

    def worker_raylet(self) -> psutil.Process:
        """The worker node's raylet (its node manager listens on `worker_port`)."""
        flag = f"--node_manager_port={self.worker_port}"
        found = [p for p in self._processes() if "raylet" in p.name() and flag in p.cmdline()]
        if len(found) != 1:
            raise RuntimeError(f"expected one worker raylet, found {found}")
        return found[0]

    def _processes(self) -> list[psutil.Process]:
        mine = []
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(str(self.tmp) in a for a in p.info["cmdline"] or []):
                    mine += [p, *p.children(recursive=True)]
        return mine

    def stop(self) -> None:
        procs = self._processes()
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(procs, timeout=30)
        shutil.rmtree(self.tmp, ignore_errors=True)
