"""Multi-process training on CPU: `clinbundle train --nproc 2` re-runs itself under torchrun (gloo)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from conftest import TINY, train_until_signal


@pytest.mark.slow
def test_two_processes_train_one_run_one_version_and_resume_under_torchrun(
    tmp_path: Path, synth_data: Path
) -> None:
    """SIGTERM to a 2-process job mid-epoch, then `--resume latest --nproc 2` elsewhere."""
    epochs = 2
    uri = f"sqlite:///{tmp_path / 'shared.db'}"  # stands in for the tracking server
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = uri
    sets = [*TINY, f"train.epochs={epochs}", "compute.batch_size=1", "tracking.experiment=ddp"]
    args = ["train", "--nproc", "2", "--data", str(synth_data), "--workdir", str(tmp_path / "a")]
    args += [a for s in sets for a in ("--set", s)]
    # 4 training volumes, batch 1, 2 ranks -> 2 steps per rank and epoch
    rc, err, seen = train_until_signal(
        args, tmp_path, env, r"\[rank 0\].*epoch 2 step 1/2 ", signal.SIGTERM
    )
    assert seen and rc != 0, err[-4000:]
    assert err.count("received SIGTERM: finishing the current step") == 2, err[-4000:]  # both ranks

    client = MlflowClient(uri, registry_uri=uri)
    exp = client.get_experiment_by_name("ddp")
    (run,) = client.search_runs([exp.experiment_id])  # rank 1 logged nothing of its own
    assert run.info.status == "KILLED" and run.data.tags["clinbundle.status"] == "interrupted"
    assert run.data.params["train_world_size"] == "2"
    assert run.data.tags["clinbundle.last_checkpoint"].startswith("epoch=1 step=")

    resume = ["train", "--nproc", "2", "--resume", "latest", "--workdir", str(tmp_path / "b")]
    r = subprocess.run(
        [sys.executable, "-m", "clinbundle", *resume, "--set", "tracking.experiment=ddp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["clinbundle.resumes"] == "1"
    for key in ("train_loss", "dice", "compound"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, epochs + 1)), (key, steps)
    versions = client.search_model_versions("name='tiny-vessels'")
    assert [v.run_id for v in versions] == [run.info.run_id]
