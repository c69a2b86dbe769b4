"""Preemption and resume with real signals, real `clinbundle train` processes and a real server.

The uninterrupted reference run and the interrupted-then-resumed runs share one config; a resumed
run must end with the same weights and the same metric history, in the same MLflow run.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from clinbundle.cli import _strip_nproc, main
from clinbundle.runtime.errors import ConfigError
from clinbundle.training.resume import RESUME_OVERRIDABLE, resume_config
from clinbundle.training.run import run_training
from clinbundle.training.trainer import CheckpointPolicy, epoch_seeds

from conftest import TINY, train_until_signal

EPOCHS, EVERY = 4, 2
#: batch size 1: 4 training volumes -> 4 steps per epoch, so "mid-epoch" has room
PRE = [
    *TINY,
    f"train.epochs={EPOCHS}",
    "compute.batch_size=1",
    f"train.checkpoint_every_epochs={EVERY}",
]
NOT_COMPARED = {"epoch_seconds"}  # wall-clock time may differ between runs
SYSTEM = "system/"  # prefix of MLflow system metrics: the machine measured, not the training


def _sets(items: list[str]) -> list[str]:
    return [a for it in items for a in ("--set", it)]


def _cli_env(url: str) -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_TRACKING_URI": url
    }


def _resume(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "clinbundle", "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _last(client: MlflowClient, run_id: str, tmp: Path) -> dict:
    path = client.download_artifacts(run_id, "checkpoints/last.pt", str(tmp))
    return torch.load(path, map_location="cpu", weights_only=True)


def _history(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    keys = {k for k in client.get_run(run_id).data.metrics if not k.startswith(SYSTEM)}
    keys -= NOT_COMPARED
    return {
        k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in keys
    }


@pytest.fixture(scope="module")
def reference(
    shared_mlflow_server, synth_data: Path, tmp_path_factory: pytest.TempPathFactory, trained
):
    """The uninterrupted run every interrupted one is compared with."""
    dest = tmp_path_factory.mktemp("reference")
    return _uninterrupted(dest, synth_data, shared_mlflow_server.url, trained, PRE, "reference")


def _uninterrupted(dest: Path, data: Path, url: str, trained, sets: list[str], name: str):
    """(client, run id, its `last` checkpoint) of a run trained in this process to the end."""
    state = run_training(
        dest / "run",
        overrides=[
            f"data.root={data}",
            *sets,
            f"tracking.tracking_uri={url}",
            f"tracking.experiment={name}",
            f"tracking.model_name={name}",
        ],
    )
    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    client = MlflowClient(url, registry_uri=url)
    run_id = state.extra["run_id"]
    return client, run_id, _last(client, run_id, dest / "last")


def _assert_same_training(client: MlflowClient, run_id: str, reference, tmp: Path) -> None:
    ref_client, ref_id, ref_last = reference
    last = _last(client, run_id, tmp)
    diff = max((last["model"][k] - ref_last["model"][k]).abs().max().item() for k in last["model"])
    assert diff <= 1e-6, diff
    ours, theirs = _history(client, run_id), _history(ref_client, ref_id)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert [s for s, _ in ours[key]] == [s for s, _ in theirs[key]], key  # each step once
        assert [v for _, v in ours[key]] == pytest.approx([v for _, v in theirs[key]], abs=1e-6)


def _one_run_one_version(client: MlflowClient, experiment: str, model: str) -> str:
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.tags["clinbundle.status"] == "finished"
    versions = client.search_model_versions(f"name='{model}'")
    assert [v.run_id for v in versions] == [run.info.run_id]
    return run.info.run_id


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_on_a_fresh_workdir_is_the_same_training(
    tmp_path: Path, synth_data: Path, shared_mlflow_server, reference
) -> None:
    url, env = shared_mlflow_server.url, _cli_env(shared_mlflow_server.url)
    client = MlflowClient(url, registry_uri=url)
    sets = _sets([*PRE, "tracking.experiment=sigterm", "tracking.model_name=sigterm"])
    args = ["train", "--data", str(synth_data), "--workdir", str(tmp_path / "a"), *sets]
    rc, err, seen = train_until_signal(args, tmp_path, env, r"epoch 2 step 1/4 ", signal.SIGTERM)
    assert seen and rc == 143, err[-3000:]
    assert "Traceback" not in err and "interrupted: received SIGTERM" in err, err[-2000:]

    (run,) = client.search_runs([client.get_experiment_by_name("sigterm").experiment_id])
    assert run.info.status == "KILLED"
    assert run.data.tags["clinbundle.status"] == "interrupted"
    assert run.data.tags["clinbundle.status_reason"] == "received SIGTERM"
    last = _last(client, run.info.run_id, tmp_path / "dl")
    assert last["epoch"] == 1 and last["step"] >= 1, (last["epoch"], last["step"])  # mid epoch 2
    assert run.data.tags["clinbundle.last_checkpoint"] == f"epoch=1 step={last['step']}"
    assert client.search_model_versions("name='sigterm'") == []

    r = _resume(["--resume", run.info.run_id, "--workdir", str(tmp_path / "b")], tmp_path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = _one_run_one_version(client, "sigterm", "sigterm")
    assert run_id == run.info.run_id
    _assert_same_training(client, run_id, reference, tmp_path / "dl2")


@pytest.mark.slow
def test_sigkill_then_resume_latest_loses_at_most_the_checkpoint_interval(
    tmp_path: Path, synth_data: Path, shared_mlflow_server, reference
) -> None:
    url, env = shared_mlflow_server.url, _cli_env(shared_mlflow_server.url)
    client = MlflowClient(url, registry_uri=url)
    sets = _sets([*PRE, "tracking.experiment=sigkill", "tracking.model_name=sigkill"])
    args = ["train", "--data", str(synth_data), "--workdir", str(tmp_path / "a"), *sets]
    killed_in = 4  # epochs 1-3 are done, their metrics logged; `last` is from epoch 2
    rc, err, seen = train_until_signal(
        args, tmp_path, env, rf"epoch {killed_in} step 1/4 ", signal.SIGKILL
    )
    assert seen and rc == -signal.SIGKILL, err[-3000:]
    (run,) = client.search_runs([client.get_experiment_by_name("sigkill").experiment_id])
    assert run.info.status == "RUNNING"  # nobody could end it
    assert [m.step for m in client.get_metric_history(run.info.run_id, "dice")] == [1, 2, 3]

    r = _resume(
        [
            "--resume",
            "latest",
            "--workdir",
            str(tmp_path / "b"),
            "--set",
            "tracking.experiment=sigkill",
        ],
        tmp_path,
        env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    resumed_from = int(re.search(r"resuming run \w+ from the end of epoch (\d+)", r.stderr)[1])
    lost_epochs = (killed_in - 1) - resumed_from  # finished epochs that had to be redone
    assert 0 <= lost_epochs < EVERY, (resumed_from, killed_in)
    run_id = _one_run_one_version(client, "sigkill", "sigkill")
    assert run_id == run.info.run_id
    tags = client.get_run(run_id).data.tags
    assert tags["clinbundle.resumes"] == "1"
    # epoch 3 was trained twice but is logged once, with the same values as without the kill
    _assert_same_training(client, run_id, reference, tmp_path / "dl")


@pytest.mark.slow
def test_a_compiled_network_stopped_and_resumed_is_the_same_training(
    tmp_path: Path, synth_data: Path, shared_mlflow_server, trained
) -> None:
    """compute.compile=true (issue 15): the compiled run, stopped by SIGTERM mid-epoch and
    resumed in a fresh process, recompiles the same graph and ends exactly where the
    uninterrupted compiled run ends."""
    url, env = shared_mlflow_server.url, _cli_env(shared_mlflow_server.url)
    client = MlflowClient(url, registry_uri=url)
    compiled = [*PRE, "train.epochs=2", "compute.compile=true"]
    reference = _uninterrupted(tmp_path / "ref", synth_data, url, trained, compiled, "compiled-ref")

    sets = _sets([*compiled, "tracking.experiment=compiled", "tracking.model_name=compiled"])
    args = ["train", "--data", str(synth_data), "--workdir", str(tmp_path / "a"), *sets]
    rc, err, seen = train_until_signal(args, tmp_path, env, r"epoch 2 step 1/4 ", signal.SIGTERM)
    assert seen and rc == 143, err[-3000:]
    assert "compute.compile = True (user: set by the user)" in err, err[-3000:]
    resume = ["--resume", "latest", "--set", "tracking.experiment=compiled"]  # compile: the run's
    r = _resume([*resume, "--workdir", str(tmp_path / "b")], tmp_path, env)
    assert r.returncode == 0, r.stderr[-3000:]
    run_id = _one_run_one_version(client, "compiled", "compiled")
    _assert_same_training(client, run_id, reference, tmp_path / "dl")


# --- bad --resume input: one line, exit 2, no new run ------------------------------------------


@pytest.fixture
def resume_store(tmp_path: Path, monkeypatch):
    """A work dir whose store holds one interrupted run that never wrote `last`."""
    monkeypatch.setenv("MLFLOW_ENV_ROOT", str(tmp_path / "envs"))
    # mlflow.set_tracking_uri exports it; here the work dir's own sqlite store is meant
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    exp = client.create_experiment("errs", artifact_location=(tmp_path / "art").as_uri())
    run = client.create_run(exp, tags={"clinbundle.status": "interrupted"})
    client.set_terminated(run.info.run_id, "KILLED")
    return tmp_path, client, exp, run.info.run_id


@pytest.mark.parametrize(
    ("ref", "needle"),
    [
        ("0123456789abcdef0123456789abcdef", "no MLflow run '0123456789abcdef"),
        ("RUN", "has no checkpoints/last.pt to resume from"),
        ("latest", "no interrupted, killed or failed run with a `last` checkpoint"),
    ],
)
def test_bad_resume_is_one_clear_error_and_creates_no_run(
    resume_store, ref: str, needle: str, capsys, tracking
) -> None:
    workdir, client, exp, run_id = resume_store
    ref = run_id if ref == "RUN" else ref
    try:
        code = main(
            [
                "train",
                "--resume",
                ref,
                "--workdir",
                str(workdir),
                "--set",
                "tracking.experiment=errs",
            ]
        )
    finally:
        mlflow.set_tracking_uri(tracking.tracking_uri)
        mlflow.set_registry_uri(tracking.tracking_uri)
    err = capsys.readouterr().err
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert len(client.search_runs([exp])) == 1


def test_resume_may_only_change_where_and_how_often() -> None:
    saved = {"data": {"root": "/old"}, "train": {"epochs": 4, "lr": 0.003}}
    cfg = resume_config(saved, ["data.root=/new", "train.checkpoint_every_minutes=5"])
    assert str(cfg.data.root) == "/new" and cfg.train.checkpoint_every_minutes == 5
    assert cfg.train.lr == 0.003
    with pytest.raises(ConfigError, match="train.lr cannot change when resuming"):
        resume_config(saved, ["train.lr=0.1"])
    assert "train.epochs" not in RESUME_OVERRIDABLE


def test_epoch_seeds_depend_only_on_seed_epoch_and_rank() -> None:
    assert epoch_seeds(0, 3, 0) == epoch_seeds(0, 3, 0)
    assert len({epoch_seeds(s, e, r) for s in (0, 1) for e in (1, 2) for r in (0, 1)}) == 8


def test_checkpoint_policy_epochs_and_minutes() -> None:
    p = CheckpointPolicy(every_epochs=3, every_minutes=None)
    assert [e for e in range(1, 10) if p.epoch_due(e)] == [3, 6, 9] and not p.time_due()
    p = CheckpointPolicy(every_epochs=100, every_minutes=1e-9)
    assert p.time_due() and p.epoch_due(1)


def test_nproc_is_stripped_before_torchrun() -> None:
    argv = ["train", "--nproc", "2", "--data", "d", "--nproc=3", "--set", "a=1"]
    assert _strip_nproc(argv) == ["train", "--data", "d", "--set", "a=1"]


class _Planted:
    """Unpickling this runs code: it writes `marker`. A checkpoint holding it must be refused."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_unpickled(
    resume_store, tmp_path: Path
) -> None:
    workdir, client, exp, run_id = resume_store
    marker = tmp_path / "MARKER"
    planted = tmp_path / "plant" / "last.pt"
    planted.parent.mkdir()
    torch.save({"epoch": 1, "model": {}, "config": _Planted(marker)}, planted)
    torch.load(planted, weights_only=False)  # the control: a full unpickle does run it
    assert marker.exists()
    marker.unlink()
    client.log_artifact(run_id, str(planted), "checkpoints")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING")}
    r = _resume(
        ["--resume", run_id, "--workdir", str(workdir), "--set", "tracking.experiment=errs"],
        workdir,
        env | {"MLFLOW_ENV_ROOT": str(workdir / "envs")},
    )
    assert r.returncode == 2, r.stderr[-3000:]
    assert "checkpoints/last.pt holds more than tensors and plain data" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and not marker.exists()
    assert len(client.search_runs([exp])) == 1
