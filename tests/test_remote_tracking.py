"""MLFLOW_TRACKING_URI is honoured: a real `mlflow server` on 127.0.0.1 receives everything."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from clinbundle.training.run import run_training

from conftest import TINY


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server-artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url + "/health", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError((tmp_path / "server.log").read_text()) from None
                time.sleep(0.5)
        else:
            raise RuntimeError("mlflow server did not become healthy in 60 s")
        yield url, tmp_path / "server-artifacts"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.slow
def test_training_logs_and_registers_on_a_remote_server(
    tmp_path: Path, synth_data: Path, mlflow_server, monkeypatch, tracking
) -> None:
    url, store = mlflow_server
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    workdir = tmp_path / "work"
    state = run_training(
        workdir,
        overrides=[
            f"data.root={synth_data}",
            *TINY,
            "train.epochs=1",
            "tracking.model_name=remote",
        ],
    )
    try:
        assert mlflow.get_tracking_uri() == url
        client = MlflowClient(url)
        run = client.get_run(state.extra["run_id"])
        assert run.info.status == "FINISHED"
        names = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/last.pt" in names and "checkpoints/best_dice.pt" in names
        mv = client.get_model_version_by_alias("remote", "challenger")
        assert str(mv.version) == state.extra["model_version"]
        # the artifacts live on the server's store, and nothing MLflow-ish stayed in the work dir
        assert any(p.name == "last.pt" for p in store.rglob("*.pt"))
        assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()
        model = mlflow.pyfunc.load_model("models:/remote@challenger")
        assert model.metadata.metadata["inference_contract"]["num_classes"] == 2
    finally:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking.tracking_uri)
        mlflow.set_registry_uri(tracking.tracking_uri)
