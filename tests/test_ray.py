"""Cohorts and training grids on a real Ray cluster: a head and a worker node started by the
test (`ray start`, 1 CPU each, their own temp dir and auth token), a real `mlflow server`."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from clinbundle.packaging.bento import free_port

from conftest import TINY

pytest.importorskip("ray", reason="the ray extra: pip install 'clinbundle[ray]'")
pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).parent / "ray")


class RayCluster:
    """`ray start --head` and one `ray start --address` on this machine (1 CPU each).

    Stopped by process id (every process whose command line names this cluster's temp dir, and
    their children), never with `ray stop`, which would stop every Ray of the user's machine.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        # short, in the system temp: Ray's socket paths under it must fit in 107 bytes
        self.tmp = Path(tempfile.mkdtemp(prefix="cb-ray-"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.worker_port = free_port()
        token = root / "token"
        token.write_text(secrets.token_hex(32))
        self.env = os.environ | {
            "RAY_TMPDIR": str(self.tmp),
            "RAY_AUTH_MODE": "token",  # the driver needs the same two variables
            "RAY_AUTH_TOKEN_PATH": str(token),
            "RAY_USAGE_STATS_ENABLED": "0",
            # a killed node is declared dead in ~2 s, not 15
            "RAY_health_check_period_ms": "500",
            "RAY_health_check_failure_threshold": "3",
        }

    def _start(self, *args: str) -> None:
        common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats"]
        store = ["--object-store-memory", str(200 * 2**20)]
        r = subprocess.run(
            [RAY, "start", *args, *common, *store],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]

    def start(self) -> None:
        head = ["--head", "--port", str(self.port), "--include-dashboard", "false"]
        self._start(*head, "--temp-dir", str(self.tmp))
        self._start("--address", self.address, "--node-manager-port", str(self.worker_port))

    def worker_raylet(self) -> psutil.Process:
        """The worker node's raylet (its node manager listens on `worker_port`)."""
        flag = f"--node_manager_port={self.worker_port}"
        found = [p for p in self._processes() if "raylet" in p.name() and flag in p.cmdline()]
        assert len(found) == 1, found
        return found[0]

    def _processes(self) -> list[psutil.Process]:
        mine = []
        for p in psutil.process_iter(["cmdline"]):
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


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = RayCluster(tmp_path_factory.mktemp("raycluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _clinbundle(args: list[str], cwd: Path, env: dict, timeout: int = 900):
    r = subprocess.run(
        [sys.executable, "-m", "clinbundle", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r


def test_a_grid_runs_as_ray_tasks_against_a_real_tracking_server(
    ray_cluster: RayCluster, mlflow_server, synth_data: Path, tmp_path: Path
) -> None:
    """2 losses x 2 folds, each trial a Ray task on either node: one parent, 4 children, 4
    registered versions, all on the server."""
    sets = [*TINY, "train.epochs=1", "tracking.model_name=ray-grid", "loss.name=dice_ce,cldice"]
    args = ["-v", "train", "--data", str(synth_data), "--workdir", str(tmp_path / "work")]
    args += ["--folds", "0,1", "--engine", "ray", "--address", ray_cluster.address]
    args += ["--tracking-uri", mlflow_server.url, *(a for s in sets for a in ("--set", s))]
    r = _clinbundle(args, tmp_path, ray_cluster.env)
    assert r.returncode == 0, r.stderr[-6000:]
    parent_id = r.stdout.strip().splitlines()[-1].removeprefix("grid ")

    client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["engine"] == "ray"
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )
    assert len(children) == 4 and all(c.info.status == "FINISHED" for c in children)
    combos = {(c.data.params["loss_name"], c.data.tags["fold_id"]) for c in children}
    assert combos == {(loss, f) for loss in ("dice_ce", "cldice") for f in ("0", "1")}
    versions = client.search_model_versions("name = 'ray-grid'")
    assert sorted(v.run_id for v in versions) == sorted(c.info.run_id for c in children)
    # nothing of MLflow's was written locally: the workers logged to the server
    assert not (tmp_path / "work" / "mlflow.db").exists()


def test_a_grid_on_ray_refuses_a_local_tracking_store(
    synth_data: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """A sqlite store in the work dir is invisible to workers on other machines: exit 2 before
    any run exists or Ray starts."""
    from clinbundle.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    args = ["train", "--data", str(synth_data), "--workdir", str(tmp_path), "--folds", "0,1"]
    assert main([*args, "--engine", "ray"]) == 2
    assert "needs a remote MLflow tracking server" in capsys.readouterr().err
    assert main([*args, "--engine", "ray", "--tracking-uri", "sqlite:///x.db"]) == 2
    assert not list(tmp_path.iterdir())
