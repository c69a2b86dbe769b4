"""Multi-process training on CPU: `clinbundle train --nproc 2` re-runs itself under torchrun (gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY


@pytest.mark.slow
def test_two_processes_train_one_run_and_register_one_version(
    tmp_path: Path, synth_data: Path
) -> None:
    workdir, epochs = tmp_path / "work", 2
    sets = [*TINY, f"train.epochs={epochs}", "compute.batch_size=1", "tracking.experiment=ddp"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    r = subprocess.run(
        [sys.executable, "-m", "clinbundle", "train", "--nproc", "2", "--data", str(synth_data)]
        + ["--workdir", str(workdir)]
        + [a for s in sets for a in ("--set", s)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([exp.experiment_id])  # rank 1 logged nothing of its own
    assert run.info.status == "FINISHED"
    assert run.data.params["train_world_size"] == "2"
    for key in ("train_loss", "dice", "compound"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, epochs + 1)), (key, steps)
    versions = client.search_model_versions("name='tiny-vessels'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    # each rank trained on its own half: 4 training volumes, batch 1 -> 2 steps per rank
    assert "0/2 [" in r.stderr and "0/4 [" not in r.stderr
