"""Cohorts and training grids on a real Ray cluster: a head and a worker node started by the
test (`ray start`, 1 CPU each, their own temp dir and auth token), a real `mlflow server`."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from clinbundle.cohort.atomic import TEMP_PREFIX
from clinbundle.cohort.manifest import MANIFEST
from clinbundle.cohort.model import ModelSpec
from clinbundle.cohort.ray_engine import plan_pool
from clinbundle.ray_cluster import LoopbackCluster, RayUnavailable, probe, ray_session
from clinbundle.runtime.errors import ClinbundleError, ConfigError, DeviceError
from clinbundle.training.ray_grid import TrialResources, trial_gpus

from conftest import TINY


def test_the_pool_and_trial_resources_follow_the_cluster_and_fail_loudly(monkeypatch) -> None:
    """Decisions made before any Ray work: GPUs only where asked or present, cuda without a
    GPU is an error, the pool never outgrows the cases, overrides win."""
    cpu_cluster, gpu_cluster = {"CPU": 4.0}, {"CPU": 8.0, "GPU": 2.0}
    spec = ModelSpec(model=None, bundle=Path("b"), device="auto")
    assert plan_pool(10, spec, cpu_cluster) == (4, 0.5, 0.0)
    assert plan_pool(3, spec, cpu_cluster) == (3, 0.5, 0.0)
    assert plan_pool(10, spec, gpu_cluster) == (2, 0.5, 1.0)
    assert plan_pool(10, replace(spec, device="cpu"), gpu_cluster) == (8, 0.5, 0.0)
    with pytest.raises(DeviceError, match="no GPU"):
        plan_pool(10, replace(spec, device="cuda"), cpu_cluster)
    monkeypatch.setenv("CLINBUNDLE_RAY_ACTORS", "2")
    monkeypatch.setenv("CLINBUNDLE_RAY_ACTOR_CPUS", "1.5")
    assert plan_pool(10, spec, cpu_cluster) == (2, 1.5, 0.0)
    monkeypatch.setenv("CLINBUNDLE_RAY_ACTORS", "two")
    with pytest.raises(ClinbundleError, match="not a number"):
        plan_pool(10, spec, cpu_cluster)

    auto = TrialResources()
    assert trial_gpus(auto, "auto", gpu_cluster) == 1.0
    assert trial_gpus(auto, "auto", cpu_cluster) == 0.0
    assert trial_gpus(auto, "cpu", gpu_cluster) == 0.0
    assert trial_gpus(TrialResources(gpus=0.5), "auto", gpu_cluster) == 0.5
    with pytest.raises(ConfigError, match="compute.device=cuda"):
        trial_gpus(auto, "cuda", cpu_cluster)
    with pytest.raises(ConfigError, match="the cluster has 2"):
        trial_gpus(TrialResources(gpus=4), "auto", gpu_cluster)


def test_a_cluster_that_does_not_answer_is_one_clear_error() -> None:
    """`ray.init` would retry a dead address for minutes; the probe says so at once (exit 2)."""
    dead = pytest.raises(RayUnavailable, match="no Ray cluster answers at 127.0.0.1:1")
    with dead, ray_session("127.0.0.1:1"):
        pass
    with pytest.raises(RayUnavailable, match="HOST:PORT"):
        probe("headnode")
    assert issubclass(RayUnavailable, ClinbundleError) and RayUnavailable.exit_code == 2


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory):
    cluster = LoopbackCluster(tmp_path_factory.mktemp("raycluster"))
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


def _cohort(data: Path, folder: Path) -> Path:
    """The session's 9 volumes (mixed spacings and orientations) and one truncated file."""
    folder.mkdir(parents=True)
    images = sorted(data.glob("images*/*.nii.gz"))
    for src in images:
        shutil.copy(src, folder / src.name)
    raw = images[0].read_bytes()
    (folder / "corrupt.nii.gz").write_bytes(raw[: len(raw) // 3])
    return folder


def _labels(folder: Path) -> dict[str, bytes]:
    """Output name -> the label array's bytes (not the file's: gzip stores a time stamp)."""
    return {p.name: np.asarray(nib.load(p).dataobj).tobytes() for p in folder.glob("*_seg.nii.gz")}


def _predict_args(packaged, src: Path, out: Path) -> list[str]:
    wd = packaged.trained.workdir
    return ["predict", "--bundle", str(packaged.bundle), "--input", str(src), "--output",
            str(out), "--workdir", str(wd), "--device", "cpu"]  # fmt: skip


@pytest.mark.slow
def test_a_cohort_on_the_cluster_equals_the_local_engine(
    ray_cluster: LoopbackCluster, packaged, tmp_path: Path
) -> None:
    """Same labels (byte-equal arrays) and the same table rows; the corrupt case fails on Ray
    with the same reason. Only `seconds` differs, and the uncertainty by float rounding (one
    runtime thread per actor sums in another order than the local default)."""
    from clinbundle.cli import main

    src = _cohort(packaged.trained.data, tmp_path / "in")
    assert main(_predict_args(packaged, src, tmp_path / "local")) == 0
    args = [*_predict_args(packaged, src, tmp_path / "ray"), "--engine", "ray"]
    r = _clinbundle([*args, "--address", ray_cluster.address], tmp_path, ray_cluster.env)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "10 case(s): 9 done, 1 failed" in r.stdout

    local, ray = _labels(tmp_path / "local"), _labels(tmp_path / "ray")
    assert len(local) == 9 and local == ray
    a = pd.read_parquet(tmp_path / "local" / "predictions.parquet")
    b = pd.read_parquet(tmp_path / "ray" / "predictions.parquet")
    pd.testing.assert_frame_equal(
        a.drop(columns=["seconds", "uncertainty"]), b.drop(columns=["seconds", "uncertainty"])
    )
    np.testing.assert_allclose(a.uncertainty, b.uncertainty, rtol=1e-5)
    assert b[b.status == "failed"].case_id.tolist() == ["corrupt"]
    lines = (tmp_path / "ray" / MANIFEST).read_text().splitlines()
    assert sorted(json.loads(x)["case_id"] for x in lines) == sorted(b.case_id)


@pytest.mark.slow
def test_a_grid_runs_as_ray_tasks_against_a_real_tracking_server(
    ray_cluster: LoopbackCluster, mlflow_server, synth_data: Path, tmp_path: Path
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


def _worker_actor(raylet: psutil.Process) -> bool:
    """Whether a pool actor (`ray::MapWorker(...CasePredictor...)`) lives on that node."""
    for p in raylet.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "CasePredictor" in " ".join(p.cmdline()):
                return True
    return False


@pytest.mark.slow
def test_killing_the_worker_node_mid_cohort_still_gives_every_case_once(
    ray_cluster: LoopbackCluster, packaged, tmp_path: Path
) -> None:
    """The worker node's raylet and every process under it (its pool actor among them) are
    killed once outputs have landed and while the actor works; the job finishes on the head
    with every case exactly once in the table, the manifest and on disk. Runs last in this
    module: it leaves the cluster without its worker."""
    src = _cohort(packaged.trained.data, tmp_path / "in")
    out = tmp_path / "out"
    args = [*_predict_args(packaged, src, out), "--engine", "ray", "--address", ray_cluster.address]
    raylet = ray_cluster.worker_raylet()
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-m", "clinbundle", *args],
            cwd=tmp_path, env=ray_cluster.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 600
            while not (list(out.glob("*_seg.nii.gz")) and _worker_actor(raylet)):
                assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-6000:]
                assert time.monotonic() < deadline, "no output landed in 600 s"
                time.sleep(0.1)
            before = {p.name for p in out.glob("*_seg.nii.gz")}
            victims = [raylet, *raylet.children(recursive=True)]
            for p in victims:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.kill()
            psutil.wait_procs(victims, timeout=30)
            rc = driver.wait(timeout=600)
        finally:
            if driver.poll() is None:
                driver.kill()
    text = (tmp_path / "driver.log").read_text()
    assert rc == 0, text[-6000:]
    after = set(_labels(out))
    assert 0 < len(before) < 9 and len(after) == 9, (before, after)  # the kill landed mid-job
    t = pd.read_parquet(out / "predictions.parquet")
    assert t.case_id.is_unique and len(t) == 10 and (t.status == "done").sum() == 9
    assert sorted(t[t.status == "done"].output) == sorted(after)
    lines = (out / MANIFEST).read_text().splitlines()
    assert sorted(json.loads(x)["case_id"] for x in lines) == sorted(t.case_id)
    assert not [p for p in out.iterdir() if p.name.startswith(TEMP_PREFIX)]
