"""The analysis flow end to end on a 2-loss x 2-fold grid of the tiny model: one command trains
the grid, `evaluate` scores every checkpoint with CIs, `compare` tags, aliases and reports, and
a metric registered after training is computed from the saved predictions alone."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from clinbundle import metric_definitions as M
from clinbundle.analysis.evaluate import EVAL_TAG, UPSTREAM_TAG, checkpoints_of, training_runs
from clinbundle.cli import main

from conftest import TINY

pytestmark = pytest.mark.slow

LOSSES = ("dice_ce", "cbdice_cldice")
GRID_SETTINGS = [
    *TINY,
    "data.folds=2",
    "train.epochs=2",
    "tracking.model_name=grid-vessels",
    f"loss.name={','.join(LOSSES)}",
]


def _run_cli(args: list[str], capsys) -> list[str]:
    code = main(args)
    out = capsys.readouterr()
    assert code == 0, out.err[-3000:]
    return out.out.strip().splitlines()


@pytest.fixture(scope="module")
def grid(synth_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """`clinbundle train --folds all --set loss.name=a,b`: the grid in one command."""
    wd = tmp_path_factory.mktemp("grid")
    sets = [x for s in GRID_SETTINGS for x in ("--set", s)]
    code = main(["train", "--data", str(synth_data), "--workdir", str(wd), "--folds", "all", *sets])
    assert code == 0
    client = MlflowClient()
    parents = [
        r
        for r in client.search_runs(
            [client.get_experiment_by_name("tests").experiment_id],
            filter_string="tags.`clinbundle.grid` = 'parent'",
        )
    ]
    assert len(parents) == 1
    return wd, parents[0].info.run_id


def test_grid_trains_losses_times_folds_under_one_parent(grid) -> None:
    _, parent = grid
    client = MlflowClient()
    children = training_runs(parent)
    assert sorted((c.data.tags["loss_type"], c.data.tags["fold_id"]) for c in children) == sorted(
        (loss, fold) for loss in LOSSES for fold in ("0", "1")
    )
    split = mlflow.artifacts.load_dict(f"runs:/{parent}/grid/split.json")
    assert split["folds"] == 2 and set(split["fold_0"]["val"]).isdisjoint(split["fold_1"]["val"])
    assert not set(split["test"]) & set(split["fold_0"]["train"] + split["fold_0"]["val"])
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parent
        assert client.search_model_versions(f"run_id = '{c.info.run_id}'"), "not registered"
        assert "checkpoints/last.pt" in checkpoints_of(c.info.run_id)
    assert client.get_run(parent).data.params["grid_loss.name"] == ",".join(LOSSES)


def test_evaluate_then_compare(grid, capsys) -> None:
    wd, parent = grid
    client = MlflowClient()
    lines = _run_cli(["evaluate", parent, "--workdir", str(wd)], capsys)
    children = training_runs(parent)
    # every checkpoint (6 best_* + last per run) is covered; equal weights are evaluated once
    expected = {
        (c.info.run_id, Path(p).stem) for c in children for p in checkpoints_of(c.info.run_id)
    }
    assert len(expected) == 4 * 7
    evals = [client.get_run(line.split(" -> run ")[1].split(":")[0]) for line in lines]
    covered = [
        (e.data.tags[UPSTREAM_TAG], n) for e in evals for n in e.data.tags["checkpoints"].split(",")
    ]
    assert sorted(covered) == sorted(expected)
    assert len(evals) <= 4 * 2  # 2 epochs: at most 2 distinct sets of weights per run
    ev = evals[0]
    ev_id = ev.info.run_id
    assert ev.data.tags[UPSTREAM_TAG] in {c.info.run_id for c in children}
    assert ev.data.tags[EVAL_TAG] == "checkpoint"
    lo, mean, hi = (ev.data.metrics[f"dice/{k}"] for k in ("ci95_low", "mean", "ci95_high"))
    assert lo <= mean <= hi
    arts = {a.path for a in client.list_artifacts(ev_id)}
    assert "eval_results_table.json" in arts and "evaluation.json" in arts

    lines = _run_cli(["compare", parent, "--metric", "dice", "--workdir", str(wd)], capsys)
    assert any(line.startswith("dice: cbdice_cldice vs dice_ce:") for line in lines)
    name = "grid-vessels"
    versions = client.search_model_versions(f"name = '{name}'")
    tags = [v.tags for v in versions]
    assert sum(t["is_best_overall"] == "true" for t in tags) == 1
    assert sum(t["is_best_for_loss"] == "true" for t in tags) == 2
    assert sum(t["ensemble_candidate"] == "true" for t in tags) == 2  # the best loss's folds
    assert all(t["checkpoint_metric"] == "compound" and "heldout_dice" in t for t in tags)
    model = client.get_registered_model(name)
    assert {"best-dice-ce", "best-cbdice-cldice"} <= set(model.aliases)
    best = next(v for v in versions if v.tags["is_best_overall"] == "true")
    loss = best.tags["heldout_dice"]
    assert float(loss) == max(float(t["heldout_dice"]) for t in tags)
    report = {a.path for a in client.list_artifacts(parent, "compare")}
    assert {"compare/report.md", "compare/box_dice.png", "compare/training_curves.png"} <= report
    text = Path(mlflow.artifacts.download_artifacts(f"runs:/{parent}/compare/report.md"))
    md = text.read_text()
    assert "Paired bootstrap tests" in md and "![box_dice](box_dice.png)" in md


def _volume_ml(case: M.Case) -> float:
    return float((case.pred > 0).sum() * np.prod(case.spacing) / 1000.0)


def test_metric_added_after_training_from_saved_predictions(grid, capsys, monkeypatch) -> None:
    """A metric registered now is computed from the predictions `evaluate` saved: no network
    is built (building one fails here), and the value is the one the label files give."""
    wd, parent = grid
    client = MlflowClient()
    exp = client.get_experiment_by_name("tests").experiment_id
    ev = client.search_runs([exp], filter_string=f"tags.`{EVAL_TAG}` = 'checkpoint'")
    if not ev:  # this test alone: evaluate one checkpoint of one run first
        run_id = training_runs(parent)[0].info.run_id
        _run_cli(["evaluate", run_id, "--checkpoints", "best_dice", "--workdir", str(wd)], capsys)
        ev = client.search_runs([exp], filter_string=f"tags.`{EVAL_TAG}` = 'checkpoint'")
    source = ev[0]

    def no_network(*a, **k):
        raise AssertionError("a network was built")

    monkeypatch.setattr("clinbundle.analysis.evaluate.build_network", no_network)
    M.register(M.MetricDef("pred_volume_ml", "max", "ml", ".2f", "predicted volume", _volume_ml))
    try:
        args = ["evaluate", source.info.run_id, "--from-predictions", "--workdir", str(wd)]
        lines = _run_cli(args, capsys)
    finally:
        M.unregister("pred_volume_ml")
    assert len(lines) == 1 and "pred_volume_ml" in lines[0]
    new = client.get_run(lines[0].split(" -> run ")[1].split(":")[0])
    assert new.data.tags["recomputed_from"] == source.info.run_id
    # the same number straight from the saved label files and the held-out images' spacing
    summary = mlflow.artifacts.load_dict(f"runs:/{new.info.run_id}/evaluation.json")
    data = Path(client.get_run(source.data.tags[UPSTREAM_TAG]).data.params["data_root"])
    meta = json.loads((data / "dataset.json").read_text())
    expected = []
    for case, pair in zip(summary["cases"], meta["test"], strict=True):
        local = mlflow.artifacts.download_artifacts(
            f"runs:/{source.info.run_id}/predictions/{case}.npz"
        )
        labels = np.load(local)["labels"]
        zooms = nib.load(data / pair["image"]).header.get_zooms()[:3]
        expected.append(float((labels > 0).sum() * np.prod(zooms) / 1000.0))
    assert summary["scores"]["pred_volume_ml"] == pytest.approx(expected, rel=1e-5)
    assert new.data.metrics["pred_volume_ml/mean"] == pytest.approx(np.mean(expected), rel=1e-5)
    # the recomputed built-in metrics equal the original evaluation's
    original = mlflow.artifacts.load_dict(f"runs:/{source.info.run_id}/evaluation.json")
    assert summary["scores"]["dice"] == pytest.approx(original["scores"]["dice"])
