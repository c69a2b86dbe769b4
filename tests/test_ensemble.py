"""Issue 16 parts 5 and 6: the fold ensemble as one model, and `--production` training.

The ensemble's members are the session's tiny model (fold 0) and one more tiny model trained
here on fold 1 (2 epochs); both stay under their own registered names so the session's
@champion/@challenger aliases are not touched.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from clinbundle.cli import main
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.hashing import sha256_file
from tests.conftest import TINY

ENSEMBLE = "tiny-ensemble"


@pytest.fixture(scope="module")
def fold1(trained):
    """A second member: fold 1, two epochs, registered under a name of its own."""
    from clinbundle.training.run import run_training

    member = ["data.fold=1", "train.epochs=2", "tracking.model_name=tiny-fold1"]
    state = run_training(trained.workdir, overrides=[f"data.root={trained.data}", *TINY, *member])
    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    return state


def _ensemble(trained, fold1, name: str, *extra: str):
    """`clinbundle ensemble` of the two runs; the version it registered (@challenger)."""
    sources = f"{trained.run_id},{fold1.extra['run_id']}"
    args = ["ensemble", "--from", sources, "--name", name, *extra]
    assert main([*args, "--workdir", str(trained.workdir)]) == 0
    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    return MlflowClient().get_model_version_by_alias(name, "challenger")


@pytest.fixture(scope="module")
def ensemble(trained, fold1):
    """The plain ensemble (2 members, 2 forward passes a patch): packaged to every format."""
    return _ensemble(trained, fold1, ENSEMBLE)


@pytest.fixture(scope="module")
def mirrored(trained, fold1):
    """Mirrored along W: 2 members x 2 flips = 4 forward passes a patch."""
    return _ensemble(trained, fold1, ENSEMBLE + "-tta", "--mirror-axes", "2")


@pytest.mark.slow
def test_ensemble_contract_lists_members_and_averages_their_softmax(
    tracking, fold1, mirrored, tmp_path: Path
) -> None:
    import onnxruntime as ort

    from clinbundle.packaging.model_card import ensemble_section
    from clinbundle.packaging.onnx_export import export_onnx

    model = mlflow.pyfunc.load_model(f"models:/{ENSEMBLE}-tta/{mirrored.version}")
    contract = InferenceContract.model_validate(model.metadata.metadata["inference_contract"])
    spec = contract.network.ensemble
    assert spec is not None and spec.mirror_axes == [2] and spec.forward_passes == 4
    assert [m.run_id for m in spec.members] == [tracking.run_id, fold1.extra["run_id"]]
    assert [m.model_uri for m in spec.members] == [
        f"models:/{tracking.name}/{tracking.version}",
        f"models:/tiny-fold1/{fold1.extra['model_version']}",
    ]
    assert spec.members[0].checkpoint == f"runs:/{tracking.run_id}/checkpoints/best_compound.pt"
    assert mirrored.tags["ensemble_forward_passes"] == "4"
    assert mirrored.tags["ensemble_members"] == ",".join(m.model_uri for m in spec.members)

    # the members, loaded from their own registered versions, averaged by hand
    nets = []
    for m in spec.members:
        member = mlflow.pyfunc.load_model(m.model_uri)
        local = Path(mlflow.artifacts.download_artifacts(m.model_uri)) / "artifacts"
        assert sha256_file(local / "weights.pt") == m.weights_sha256
        nets.append(member.unwrap_python_model().network)
    x = torch.randn(2, 1, *contract.roi_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        by_hand = sum(torch.softmax(n(x), 1) + torch.softmax(n(x.flip(4)), 1).flip(4) for n in nets)
        merged = torch.softmax(model.unwrap_python_model().network(x), 1)
    assert torch.allclose(merged, by_hand / 4, atol=1e-6)

    # the flips are in the one ONNX graph too (dynamic spatial axes), and the card states the cost
    network = model.unwrap_python_model().network
    session = ort.InferenceSession(str(export_onnx(network, contract, tmp_path / "m.onnx")))
    patch = torch.randn(1, 1, 40, 32, 48, generator=torch.Generator().manual_seed(2))
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: patch.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(onnx_out, network(patch).numpy(), atol=1e-4)
    card = ensemble_section(contract)
    assert "mirrored along axes [2]" in card and "Cost: 4 member forward passes per patch" in card

    # and the one inference path takes it like any model: probabilities on the input's grid
    volume = np.random.default_rng(1).normal(100, 40, (1, 1, 37, 41, 35)).astype(np.float32)
    probs = model.predict(volume)
    assert probs.shape == (1, 2, 37, 41, 35)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_ensemble_packages_to_onnx_bento_and_map_with_parity(
    tracking, ensemble, tmp_path: Path, capsys
) -> None:
    wd, uri = str(tracking.workdir), f"models:/{ENSEMBLE}/{ensemble.version}"
    common = ["--model", uri, "--workdir", wd, "--device", "cpu"]
    onnx = tmp_path / "onnx"
    assert main(["package", "onnx", "--out", str(onnx), *common]) == 0
    manifest = json.loads((onnx / "manifest.json").read_text())
    assert manifest["parity"]["passed"], manifest["parity"]
    card = (onnx / "README.md").read_text()
    assert "## Ensemble" in card
    assert "Cost: 2 member forward passes per patch" in card
    contract = InferenceContract.model_validate(manifest["contract"])
    for m in contract.network.ensemble.members:
        assert f"`{m.model_uri}`" in card and f"`{m.run_id}`" in card
        assert m.weights_sha256[:16] in card

    capsys.readouterr()
    assert (
        main(["package", "bento", "--out", str(tmp_path / "bento"), "--bundle", str(onnx), *common])
        == 0
    )
    assert "parity over HTTP: " in capsys.readouterr().out
    nest = ["--onnx-bundle", str(onnx)]  # the ensemble's bundle just checked, not a second one
    assert main(["package", "map", "--out", str(tmp_path / "map"), *nest, *common]) == 0
    map_manifest = json.loads((tmp_path / "map" / "manifest.json").read_text())
    assert map_manifest["parity"]["passed"], map_manifest["parity"]


def _log_member(contract: InferenceContract, weights: dict, parent) -> str:
    """A member logged by the real pyfunc logger, as a child run of `parent` (a grid)."""
    from clinbundle.servable import log_segmentation_model

    exp = parent.info.experiment_id
    with mlflow.start_run(experiment_id=exp, run_name="member", nested=True) as run:
        log_segmentation_model(weights, contract, metadata={"selection_metric": "dice"})
    return run.info.run_id


@pytest.mark.slow
def test_a_grid_whose_members_do_not_share_a_contract_is_refused(
    tracking, ensemble, capsys
) -> None:
    """`--from GRID_RUN_ID` takes its child runs; a different normalisation and overlap in one
    of them is refused with exit 2, naming both fields; so are too few members, one run twice
    and an ensemble as a member."""
    from clinbundle.ensemble import member_uris
    from clinbundle.tracking import experiment_id

    base = mlflow.pyfunc.load_model(f"models:/{tracking.name}/{tracking.version}")
    contract = InferenceContract.model_validate(base.metadata.metadata["inference_contract"])
    weights = base.unwrap_python_model().network.state_dict()
    other = contract.model_copy(
        update={
            "normalization": contract.normalization.model_copy(
                update={"kind": "window", "a_min": 0.0, "a_max": 300.0}
            ),
            "overlap": 0.5,
        }
    )
    experiment = experiment_id("tests-ensemble-grid", tracking.workdir)
    with mlflow.start_run(experiment_id=experiment, run_name="grid") as grid:
        children = [_log_member(c, weights, grid) for c in (contract, other)]
    assert member_uris(grid.info.run_id) == [f"runs:/{c}/model" for c in children]

    capsys.readouterr()
    args = ["ensemble", "--from", grid.info.run_id, "--workdir", str(tracking.workdir)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "do not share one inference contract" in err
    assert "normalization.kind: 'zscore'" in err and "'window'" in err
    assert "overlap: 0.25" in err and "0.5" in err
    wd = ["--workdir", str(tracking.workdir)]
    assert main(["ensemble", "--from", children[0], *wd]) == 2
    assert "at least two members" in capsys.readouterr().err
    same_run = f"{tracking.run_id},models:/{tracking.name}/{tracking.version}"
    assert main(["ensemble", "--from", same_run, *wd]) == 2
    assert "the model of one run twice" in capsys.readouterr().err
    nested = f"models:/{ENSEMBLE}/{ensemble.version},models:/{tracking.name}/{tracking.version}"
    assert main(["ensemble", "--from", nested, "--name", "x", *wd]) == 2
    assert "cannot itself be an ensemble" in capsys.readouterr().err


@pytest.mark.slow
def test_production_trains_on_everything_and_is_never_promoted(
    synth_data: Path, tmp_path: Path, capsys
) -> None:
    """`clinbundle train --production`: no validation split, `last` is the model, and
    `promote` refuses its version (exit 2) and leaves the aliases alone. The weights are kept
    every `train.checkpoint_every_epochs` epochs (1 here) beside `last`."""
    from clinbundle.registry import PRODUCTION_TAG

    wd = ["--workdir", str(tmp_path)]
    sets = [
        a for o in [*TINY, "train.epochs=2", "tracking.model_name=tiny-prod"] for a in ("--set", o)
    ]
    capsys.readouterr()
    assert main(["train", "--data", str(synth_data), "--production", *sets, *wd]) == 0
    out = capsys.readouterr().out.split()
    run_id, version = out[1].rstrip(":"), out[-1].rsplit("/", 1)[1]
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.data.tags[PRODUCTION_TAG] == "true"
    n = len(json.loads((synth_data / "dataset.json").read_text())["training"])
    assert run.data.params["data_num_val"] == "0" and run.data.params["data_num_train"] == str(n)
    split = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/split.json"))
    assert split["val"] == [] and len(split["train"]) == n
    assert "train_loss" in run.data.metrics and "dice" not in run.data.metrics
    files = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    assert files == {f"checkpoints/{f}.pt" for f in ("last", "epoch_0001", "epoch_0002")}, files

    assert client.get_model_version("tiny-prod", version).tags[PRODUCTION_TAG] == "true"
    model = mlflow.pyfunc.load_model(f"models:/tiny-prod/{version}")
    assert model.metadata.metadata["checkpoint"] == "checkpoints/last.pt"

    args = ["promote", "--model", "tiny-prod", "--data", str(synth_data), "--minimum", "0"]
    assert main([*args, *wd]) == 2
    err = capsys.readouterr().err
    assert "trained with --production" in err and "promote does not decide on it" in err
    assert {k: str(v) for k, v in client.get_registered_model("tiny-prod").aliases.items()} == {
        "challenger": version
    }
