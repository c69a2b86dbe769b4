"""MLFLOW_TRACKING_URI is honoured: a real `mlflow server` on 127.0.0.1 receives everything,
even when it goes away for a while in the middle of training."""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from clinbundle.runtime.errors import TrackingError
from clinbundle.training.callbacks import Callback
from clinbundle.training.data import Dataset
from clinbundle.training.run import run_training
from clinbundle.training.run_page import DIGEST_CHARS, log_dataset_input

from conftest import TINY, MlflowServer


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


@pytest.mark.slow
def test_training_logs_and_registers_on_a_remote_server(
    tmp_path: Path, synth_data: Path, mlflow_server, monkeypatch, tracking
) -> None:
    url, store = mlflow_server.url, mlflow_server.artifacts
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
        client = MlflowClient(url, registry_uri=url)
        run = client.get_run(state.extra["run_id"])
        assert run.info.status == "FINISHED"
        names = {f.path for f in client.list_artifacts(run.info.run_id, "checkpoints")}
        assert "checkpoints/last.pt" in names and "checkpoints/best_dice.pt" in names
        mv = client.get_model_version_by_alias("remote", "challenger")
        assert str(mv.version) == state.extra["model_version"]
        # the artifacts live on the server's store, and nothing MLflow-ish stayed in the work dir
        assert any(p.name == "last.pt" for p in store.rglob("*.pt"))
        assert not (workdir / "mlflow.db").exists() and not (workdir / "mlartifacts").exists()
        # every file the run wrote locally is on the server under the same name
        local = {
            str(p.relative_to(state.out_dir))
            for p in state.out_dir.rglob("*")
            if p.is_file() and "spool" not in p.parts
        }
        assert local and local <= _artifacts(client, run.info.run_id), local
        model = mlflow.pyfunc.load_model("models:/remote@challenger")
        assert model.metadata.metadata["inference_contract"]["num_classes"] == 2
    finally:
        monkeypatch.delenv("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(tracking.tracking_uri)
        mlflow.set_registry_uri(tracking.tracking_uri)


class _ServerOutage(Callback):
    """Stops the real server after epoch `down_after`; starts it again (same port, same store)
    after epoch `up_after`, so the epochs in between are trained while it is gone."""

    def __init__(self, server: MlflowServer, down_after: int, up_after: int | None) -> None:
        self.server, self.down_after, self.up_after = server, down_after, up_after

    def on_epoch_end(self, state, metrics) -> None:
        if state.epoch == self.down_after:
            self.server.stop()
        if state.epoch == self.up_after:
            self.server.start()


@pytest.mark.slow
def test_server_outage_mid_training_is_spooled_and_flushed_exactly_once(
    tmp_path: Path, synth_data: Path, mlflow_server, tracking, caplog
) -> None:
    caplog.set_level(logging.INFO, logger="clinbundle")
    epochs = 3
    state = run_training(
        tmp_path / "work",
        overrides=[
            f"data.root={synth_data}",
            *TINY,
            f"train.epochs={epochs}",
            f"tracking.tracking_uri={mlflow_server.url}",
            "tracking.experiment=outage",
            "tracking.model_name=outage",
        ],
        extra_callbacks=[_ServerOutage(mlflow_server, down_after=1, up_after=2)],
    )
    try:
        log = caplog.text
        assert "unreachable" in log and "is back after" in log, log[-3000:]
        client = MlflowClient(mlflow_server.url, registry_uri=mlflow_server.url)
        run = client.get_run(state.extra["run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.tags["clinbundle.status"] == "finished"
        keys = {k for h in state.history for k in h if k != "epoch"}
        assert {"train_loss", "dice", "compound"} <= keys
        for key in keys:
            steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
            assert sorted(steps) == list(range(1, epochs + 1)), (key, steps)
        # the last.pt on the server is the final one, not one spooled during the outage
        hist = json.loads(
            Path(client.download_artifacts(run.info.run_id, "metric_history.json")).read_text()
        )
        assert [h["epoch"] for h in hist["history"]] == list(range(1, epochs + 1))
        assert run.data.tags["clinbundle.last_checkpoint"] == f"epoch={epochs} step=0"
        assert len(client.search_model_versions("name='outage'")) == 1
        assert not any((state.out_dir / "spool" / "files").glob("*/*"))  # flushed, cleaned up
    finally:
        mlflow.set_tracking_uri(tracking.tracking_uri)
        mlflow.set_registry_uri(tracking.tracking_uri)


@pytest.mark.slow
def test_outage_longer_than_the_limit_gives_up_clearly(
    tmp_path: Path, synth_data: Path, mlflow_server, tracking
) -> None:
    workdir = tmp_path / "work"
    try:
        with pytest.raises(TrackingError, match=r"unreachable for \d+ s .*giving up.*spooled in"):
            run_training(
                workdir,
                overrides=[
                    f"data.root={synth_data}",
                    *TINY,
                    "train.epochs=3",
                    f"tracking.tracking_uri={mlflow_server.url}",
                    "tracking.experiment=gives-up",
                    "tracking.outage_limit_s=1",
                ],
                extra_callbacks=[_ServerOutage(mlflow_server, down_after=1, up_after=None)],
            )
        # what could not be sent is still on disk, in order
        queue = next(workdir.rglob("spool/queue.jsonl")).read_text().splitlines()
        assert queue and all(json.loads(line)["kind"] for line in queue)
    finally:
        mlflow.set_tracking_uri(tracking.tracking_uri)
        mlflow.set_registry_uri(tracking.tracking_uri)


def test_runs_starting_together_log_one_dataset_without_a_lost_race(
    tmp_path: Path, mlflow_server, monkeypatch
) -> None:
    """A grid's trials start together and log the same data set to one server: MLflow looks
    the dataset up and inserts it in two statements, so all but one insert broke the unique
    key (CI's Ray grid failed on it). Several rounds of runs released at one barrier, each
    round a new data set: every run is logged and carries exactly its own input."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    exp = mlflow.set_experiment("race").experiment_id
    rounds, runs = 4, 4
    results: list[tuple[str, str]] = []

    def one(digest: str, barrier: threading.Barrier) -> None:
        ds = Dataset(root=tmp_path / "vessels", labels={}, training=[], test=[], sha256=digest)
        with mlflow.start_run(experiment_id=exp) as run:
            barrier.wait()
            log_dataset_input(ds, num_train=2, num_val=1)
            results.append((run.info.run_id, digest))

    for r in range(rounds):
        barrier = threading.Barrier(runs)
        digest = f"{r:02d}" + "ab" * 31
        with ThreadPoolExecutor(runs) as pool:
            for f in [pool.submit(one, digest, barrier) for _ in range(runs)]:
                f.result()
    assert len(results) == rounds * runs
    client = MlflowClient(mlflow_server.url)
    for run_id, digest in results:
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert [(i.dataset.name, i.dataset.digest) for i in inputs] == [
            ("vessels", digest[:DIGEST_CHARS])
        ]
