"""Training against a real sqlite MLflow registry, using the session's tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from clinbundle.runtime.errors import ConfigError, DataError, TrackingError
from clinbundle.training.callbacks import Callback
from clinbundle.training.metrics import DIRECTIONS
from clinbundle.training.run import run_training

from conftest import TINY


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    out = set()
    for f in client.list_artifacts(run_id, path):
        out |= _artifacts(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def test_every_artifact_is_in_mlflow(tracking) -> None:
    client = MlflowClient()
    arts = _artifacts(client, tracking.run_id)
    expected = {f"checkpoints/best_{m}.pt" for m in DIRECTIONS} | {
        "checkpoints/last.pt",
        "metric_history.json",
        "split.json",
        "config/config.yaml",
        "config/compute_decisions.json",
        "config/inference_contract.json",
        "environment/requirements-frozen.txt",
        "environment/system_info.json",
    }
    assert expected <= arts, expected - arts
    val_cases = {Path(it["image"]).name.split(".")[0] for it in tracking.state.split["val"]}
    assert {f"val_predictions/{c}.npz" for c in val_cases} <= arts

    local = Path(client.download_artifacts(tracking.run_id, "val_predictions"))
    npz = np.load(next(local.glob("*.npz")))
    assert npz["labels"].dtype == np.uint8 and npz["probabilities"].dtype == np.float16
    assert npz["probabilities"].shape[0] == 2

    last = torch.load(
        client.download_artifacts(tracking.run_id, "checkpoints/last.pt"), weights_only=True
    )
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "epoch", "config"} <= set(last)
    assert last["epoch"] == 8 and {"python", "numpy", "torch"} <= set(last["rng"])

    hist = json.loads(
        Path(client.download_artifacts(tracking.run_id, "metric_history.json")).read_text()
    )
    assert [h["epoch"] for h in hist["history"]] == list(range(1, 9))
    assert hist["directions"] == DIRECTIONS


def test_params_tags_and_metrics(tracking) -> None:
    run = MlflowClient().get_run(tracking.run_id)
    params, tags = run.data.params, run.data.tags
    for prefix in ("arch_", "data_", "loss_", "sys_"):
        assert any(k.startswith(prefix) for k in params), prefix
    assert params["sys_device"] == "cpu" and params["sys_device_source"] == "auto"
    assert params["sys_patch_size_source"] == "user"
    for t in ("loss_type", "fold_id", "model_family", "git_commit", "dataset_hash"):
        assert tags.get(t), t
    assert tags["model_family"] == "DynUNet" and tags["loss_type"] == "dice_ce"
    history = MlflowClient().get_metric_history(tracking.run_id, "dice")
    assert [m.step for m in history] == list(range(1, 9))
    assert all(f"best_{m}" in run.data.metrics for m in DIRECTIONS)


def test_logged_model_has_contract_signature_and_example(tracking) -> None:
    mv = MlflowClient().get_model_version_by_alias(tracking.name, "champion")
    info = mlflow.models.get_model_info(f"models:/{tracking.name}/{mv.version}")
    contract = info.metadata["inference_contract"]
    assert contract["roi_size"] == [32, 32, 32] and contract["num_classes"] == 2
    assert contract["labels"] == {"0": "background", "1": "vessel"}
    assert (
        contract["network"]["family"] == "DynUNet" and contract["normalization"]["kind"] == "zscore"
    )
    inputs = info.signature.inputs.to_dict()[0]
    assert inputs["tensor-spec"]["dtype"] == "float32"
    assert list(inputs["tensor-spec"]["shape"]) == [-1, 1, -1, -1, -1]
    assert info.saved_input_example_info is not None
    reqs = Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{tracking.name}/{mv.version}/requirements.txt"
        )
    )
    assert any(line.startswith("monai==") for line in reqs.read_text().splitlines())


def test_champion_pyfunc_predicts_any_shape_and_rejects_bad_input(tracking) -> None:
    model = mlflow.pyfunc.load_model(f"models:/{tracking.name}@champion")
    x = np.random.default_rng(0).normal(100, 40, (1, 1, 37, 41, 45)).astype(np.float32)
    p = model.predict(x)
    assert p.shape == (1, 2, 37, 41, 45) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    with pytest.raises(MlflowException, match="float64|dtype"):
        model.predict(x.astype(np.float64))
    with pytest.raises(MlflowException, match="[Ss]hape"):
        model.predict(np.concatenate([x, x], axis=1))


def test_champion_has_learned(tracking) -> None:
    """Even the tiny model beats chance clearly on its held-out volumes."""
    mv = MlflowClient().get_model_version_by_alias(tracking.name, "champion")
    assert float(mv.tags["promotion_mean"]) > 0.3


def _tiny_run(workdir: Path, data: Path, *extra: str, callbacks=None):
    return run_training(
        workdir,
        overrides=[
            f"data.root={data}",
            *TINY,
            "train.epochs=2",
            "tracking.model_name=twins",
            *extra,
        ],
        extra_callbacks=callbacks,
    )


@pytest.mark.slow
def test_twin_runs_same_seed_identical_history(tmp_path: Path, synth_data: Path, tracking) -> None:
    a = _tiny_run(tmp_path, synth_data)
    b = _tiny_run(tmp_path, synth_data)
    strip = lambda h: [{k: v for k, v in e.items() if k != "epoch_seconds"} for e in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    c = _tiny_run(tmp_path, synth_data, "train.seed=1")
    assert strip(c.history) != strip(a.history)


def test_failure_marks_run_failed_and_registers_nothing(
    tmp_path: Path, synth_data: Path, tracking
) -> None:
    class Boom(Callback):
        def on_epoch_end(self, state, metrics):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        _tiny_run(tmp_path, synth_data, "tracking.model_name=never-registered", callbacks=[Boom()])
    runs = mlflow.search_runs(
        experiment_names=["tests"], filter_string="tags.status_detail = 'failed'"
    )
    assert len(runs) >= 1 and "disk full" in runs.iloc[0]["tags.failure_reason"]
    assert MlflowClient().search_model_versions("name='never-registered'") == []


def test_bad_inputs_fail_before_a_run_starts(tmp_path: Path, synth_data: Path, tracking) -> None:
    before = len(mlflow.search_runs(search_all_experiments=True))
    with pytest.raises(ConfigError, match="unknown model"):
        _tiny_run(tmp_path, synth_data, "model.name=vnet")
    with pytest.raises(ConfigError, match="unknown loss"):
        _tiny_run(tmp_path, synth_data, "loss.name=focal")
    with pytest.raises(DataError, match="larger than a volume"):
        _tiny_run(tmp_path, synth_data, "compute.patch_size=[64,64,64]")
    with pytest.raises(DataError, match="does not exist"):
        run_training(tmp_path, overrides=[f"data.root={tmp_path / 'nope'}", *TINY])
    mlflow.set_tracking_uri(tracking.tracking_uri)
    assert len(mlflow.search_runs(search_all_experiments=True)) == before


def test_unreachable_tracking_server(
    tmp_path: Path, synth_data: Path, monkeypatch, tracking
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    with pytest.raises(TrackingError, match="cannot reach the MLflow tracking server"):
        _tiny_run(tmp_path, synth_data)
