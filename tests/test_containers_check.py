"""The container script's verdicts (.ci/containers_check.py) fail when something is lost.

`.ci/containers.sh` runs only in CI; its checker decides whether a preempted and resumed
container lost anything on the tracking server, so the checker itself must be able to say no.
Real MLflow store (sqlite), the checker run as a process as the script runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import REPO

CHECK = REPO / ".ci" / "containers_check.py"


def _check(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return subprocess.run(
        [sys.executable, str(CHECK), *args], capture_output=True, text=True, env=env, timeout=120
    )


def _run(client: MlflowClient, tmp: Path, steps: list[int], status: str, tags: dict) -> str:
    exp = client.create_experiment(
        f"e{len(client.search_experiments())}", artifact_location=(tmp / "artifacts").as_uri()
    )
    run = client.create_run(exp, tags=tags)
    for step in steps:
        for key in ("train_loss", "val_loss", "dice"):
            client.log_metric(run.info.run_id, key, 1.0 / step, step=step)
    client.log_param(run.info.run_id, "train_world_size", "1")
    (tmp / "last.pt").write_bytes(b"checkpoint")
    client.log_artifact(run.info.run_id, str(tmp / "last.pt"), "checkpoints")
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


@pytest.fixture
def store(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    client.create_registered_model("m")
    return uri, client


def test_finished_accepts_a_complete_run_and_names_what_is_lost(store, tmp_path: Path) -> None:
    uri, client = store
    done = {"clinbundle.status": "finished"}
    good = _run(client, tmp_path, [1, 2, 3], "FINISHED", done)
    client.create_model_version("m", f"runs:/{good}/model", run_id=good)
    r = _check("finished", uri, "m", good, "3", "1")
    assert r.returncode == 0 and "exactly once" in r.stdout, r.stderr

    gap = _run(client, tmp_path, [1, 3], "FINISHED", done)  # epoch 2 lost
    client.create_model_version("m", f"runs:/{gap}/model", run_id=gap)
    r = _check("finished", uri, "m", gap, "3", "1")
    assert r.returncode == 1 and "steps [1, 3]" in r.stderr, r.stderr

    twice = _run(client, tmp_path, [1, 2, 2, 3], "FINISHED", done)  # epoch 2 logged twice
    client.create_model_version("m", f"runs:/{twice}/model", run_id=twice)
    r = _check("finished", uri, "m", twice, "3", "1")
    assert r.returncode == 1 and "[1, 2, 2, 3]" in r.stderr, r.stderr

    two_versions = _run(client, tmp_path, [1, 2, 3], "FINISHED", done)
    for _ in range(2):
        client.create_model_version("m", f"runs:/{two_versions}/model", run_id=two_versions)
    r = _check("finished", uri, "m", two_versions, "3", "1")
    assert r.returncode == 1 and "registered 2 versions" in r.stderr, r.stderr

    r = _check("finished", uri, "m", good, "3", "2")  # not the world size it trained on
    assert r.returncode == 1 and "trained on 1 processes" in r.stderr, r.stderr


def test_interrupted_needs_killed_and_the_tag(store, tmp_path: Path) -> None:
    uri, client = store
    stopped = _run(client, tmp_path, [1], "KILLED", {"clinbundle.status": "interrupted"})
    r = _check("interrupted", uri, stopped)
    assert r.returncode == 0 and "tagged interrupted" in r.stdout, r.stderr
    crashed = _run(client, tmp_path, [1], "FAILED", {"clinbundle.status": "failed"})
    r = _check("interrupted", uri, crashed)
    assert r.returncode == 1 and "FAILED / failed" in r.stderr, r.stderr
