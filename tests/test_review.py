"""The review loop (issue 17, item 4): `predict --flag-worst` flags the most uncertain cases, the
demo queue shows them, their corrected labels go into the training set.

Real components throughout: `clinbundle predict` on the session's ONNX bundle, the Gradio app
served on loopback and driven through gradio_client (the page's own API, with its per-session
state), the MLflow registry, and the training set read back by the training code's own reader,
validation and transforms.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from clinbundle.apps.render import VIEW_AXIS, display_window, render_slice
from clinbundle.cli import main
from clinbundle.packaging.bento import free_port
from clinbundle.review_table import read_flagged
from clinbundle.runtime.contract import Normalization
from clinbundle.training.data import read_dataset, train_transforms, validate_dataset
from clinbundle.training.synth import write_dataset

N_CASES = 4


@pytest.fixture(scope="module")
def cohort(packaged, tmp_path_factory) -> Path:
    """Four new synthetic scans (not in the session's training set) and their true labels."""
    root = tmp_path_factory.mktemp("cohort")
    write_dataset(root / "msd", n=N_CASES, n_test=0, shape=(40, 40, 40), seed=11)
    for sub in ("scans", "truth"):
        (root / sub).mkdir()
    for i in range(N_CASES):
        name = f"vessel_{i:03d}.nii.gz"
        shutil.copyfile(root / "msd" / "imagesTr" / name, root / "scans" / f"new_{i:03d}.nii.gz")
        shutil.copyfile(root / "msd" / "labelsTr" / name, root / "truth" / f"new_{i:03d}.nii.gz")
    return root


@pytest.fixture(scope="module")
def table(cohort: Path, packaged) -> Path:
    """`clinbundle predict --flag-worst 2` over the cohort with the session's bundle."""
    out = cohort / "predicted"
    wd, bundle = packaged.trained.workdir, packaged.bundle
    rc = main(
        [
            *("predict", "--bundle", str(bundle), "--input", str(cohort / "scans")),
            *("--output", str(out), "--workdir", str(wd), "--device", "cpu", "--flag-worst", "2"),
        ]
    )
    assert rc == 0
    return out / "predictions.parquet"


def _frame(table: Path) -> pd.DataFrame:
    return pd.read_parquet(table).set_index("case_id")


def _flagged(table: Path) -> list[str]:
    """The flagged cases by falling uncertainty, and a check that they are the two worst."""
    frame = _frame(table)
    ranked = frame[frame.status == "done"].sort_values("uncertainty", ascending=False)
    flagged = list(ranked.index[ranked.flagged])
    assert len(ranked) == N_CASES and flagged == list(ranked.index[:2]), ranked[["uncertainty"]]
    return flagged


# --------------------------------------------------------------------------- the demo queue


@pytest.fixture(scope="module")
def queue_page(table: Path, packaged, tmp_path_factory):
    """`run_demo(queue=TABLE)` as `clinbundle demo --queue` calls it, served on loopback."""
    from clinbundle.apps.demo import run_demo

    workdir = tmp_path_factory.mktemp("demo-queue")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", packaged.trained.tracking_uri)
    mp.setenv("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    port = free_port()
    app = run_demo(workdir, port=port, block=False, queue=table)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
        mp.undo()


def _axial(table: Path, case_id: str) -> np.ndarray:
    """What the page must show: the input with the labels predict stored, mid axial slice."""
    row = _frame(table).loc[case_id]
    image = np.asarray(nib.load(row.input).dataobj, dtype=np.float32)
    labels = np.asarray(nib.load(table.parent / row.output).dataobj).astype(np.uint8)
    index = image.shape[VIEW_AXIS["axial"]] // 2
    return render_slice(image, "axial", index, display_window(image), labels, None, 0.5)


def test_the_demo_queue_shows_the_flagged_cases_most_uncertain_first(
    queue_page: str, table: Path, tracking, tmp_path: Path
) -> None:
    from gradio_client import Client

    flagged, frame = _flagged(table), _frame(table)
    client = Client(queue_page, verbose=False, download_files=str(tmp_path))
    shown = []
    for api in ("/queue_open", "/queue_next", "/queue_next"):
        status, *_sliders, axial, _coronal, _sagittal, loaded, _dice, _file = client.predict(
            0.5, True, True, api_name=api
        )
        case_id = status.split("`")[1]
        shown.append(case_id)
        row = frame.loc[case_id]
        assert f"uncertainty **{row.uncertainty:.4f}**" in status, status
        assert f"{row.model_name} v{row.model_version}" in status, status
        assert f"Loaded **{case_id}**" in loaded
        assert np.array_equal(np.asarray(Image.open(axial).convert("RGB")), _axial(table, case_id))
    assert shown == [flagged[0], flagged[1], flagged[1]]  # past the last: the last again

    # a review of the case on screen lands on the table's model version, keyed by content hash
    comment = f"the branch at the top is cut ({tmp_path.name})"
    stored = client.predict("wrong", comment, "dr queue", api_name="/on_flag")
    assert stored.startswith("Flag stored")
    row = frame.loc[flagged[1]]
    mlflow_client = MlflowClient()
    tags = mlflow_client.get_model_version(row.model_name, row.model_version).tags
    latest = json.loads(tags["review_latest"])
    assert latest["comment"] == comment and latest["case"] == flagged[1]
    run_id = mlflow_client.get_model_version(row.model_name, row.model_version).run_id
    artifact = latest["artifact"].split(f"runs:/{run_id}/")[1]
    review = json.loads(
        Path(mlflow_client.download_artifacts(run_id, artifact, str(tmp_path))).read_text()
    )
    assert review["case"]["sha256"] == row.content_hash and review["runtime"] == "Stored prediction"
    assert review["queue"]["output"] == row.output and review["queue"]["position"] == "2 of 2"


def test_a_bad_queue_is_exit_2_with_the_reason(
    tmp_path: Path, table: Path, tracking, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)
    frame = pd.read_parquet(table)
    unflagged, foreign, changed = (
        tmp_path / f"{n}.parquet" for n in ("none", "foreign", "changed")
    )
    frame.assign(flagged=False).to_parquet(unflagged)
    frame[["case_id", "flagged"]].to_parquet(foreign)
    notparquet = tmp_path / "notes.parquet"
    notparquet.write_text("hello")
    escape, ghost = tmp_path / "escape.parquet", table.parent / "ghost.parquet"
    frame.assign(case_id="../../etc").to_parquet(escape)
    frame.assign(model_version="999").to_parquet(ghost)  # beside its outputs: only the model
    for path, needle in (
        (tmp_path / "missing.parquet", "no such predictions table"),
        (notparquet, "not a readable Parquet table"),
        (foreign, "missing columns: input, content_hash"),
        (unflagged, "no flagged case"),
        (escape, "case_id must be letters"),
        (ghost, "v999 is not in the MLflow registry"),
    ):
        assert main(["demo", "--queue", str(path), "--workdir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
    ghost.unlink()
    # the CSV twin opens the same queue
    fields = ("case_id", "input", "content_hash", "uncertainty", "output", "model")
    same = [[getattr(c, f) for f in fields] for c in read_flagged(table.with_suffix(".csv"))]
    assert same == [[getattr(c, f) for f in fields] for c in read_flagged(table)]
    # an input changed since it was predicted is refused when the case opens
    from clinbundle.apps.review_queue import open_queue
    from clinbundle.runtime.errors import InputError

    first = _flagged(table)[0]
    moved = tmp_path / "moved.nii.gz"
    shutil.copyfile(frame.set_index("case_id").loc[_flagged(table)[1]].input, moved)
    frame.loc[frame.case_id == first, "input"] = str(moved)
    frame["output"] = [str(table.parent / o) for o in frame.output]  # the table moves to tmp
    frame.to_parquet(changed)
    queue, runtime = open_queue(changed)
    with pytest.raises(InputError, match="changed since it was predicted"):
        queue.open(0)
    # the page says so in the queue's line, shows no case, and "next" moves past it
    from clinbundle.apps.demo import ReviewerDemo, build_app

    app = build_app(ReviewerDemo([runtime], {}, tmp_path / "out", queue))
    handler = {f.api_name: f.fn for f in app.fns.values()}
    index, line, case, *_views, status, _dice, _file = handler["queue_open"](0.5, True, True)
    assert (index, case, status) == (0, None, "No case loaded.") and "cannot open" in line, line
    assert "changed since it was predicted" in line
    index, line, case, *_ = handler["queue_next"](index, 0.5, True, True)
    assert index == 1 and case.name == _flagged(table)[1] and "case 2 of 2" in line


# --------------------------------------------------------------------------- add-corrections


@pytest.fixture
def msd(packaged, tmp_path: Path) -> Path:
    """A copy of the session's training set (the one the model was trained on)."""
    return Path(shutil.copytree(packaged.trained.data, tmp_path / "vessels"))


def _corrections(cohort: Path, folder: Path, case_ids: list[str]) -> Path:
    folder.mkdir()
    for case_id in case_ids:
        shutil.copyfile(cohort / "truth" / f"{case_id}.nii.gz", folder / f"{case_id}.nii.gz")
    return folder


def test_corrections_of_flagged_cases_join_the_training_set(
    cohort: Path, table: Path, msd: Path, tmp_path: Path, capsys
) -> None:
    flagged = _flagged(table)
    labels = _corrections(cohort, tmp_path / "corrected", flagged)
    before = len(read_dataset(msd).training)
    args = ["data", "add-corrections", "--table", str(table), "--labels", str(labels)]
    assert main([*args, "--data", str(msd)]) == 0
    assert "2 added" in capsys.readouterr().out

    ds = validate_dataset(read_dataset(msd))  # what `clinbundle train` reads, fully checked
    new = {it["case"]: it for it in ds.training[before:]}
    assert len(ds.training) == before + 2 and set(new) == set(flagged)
    for case_id, item in new.items():
        row = _frame(table).loc[case_id]
        assert Path(item["image"]).read_bytes() == Path(row.input).read_bytes()
        assert Path(item["label"]).read_bytes() == (labels / f"{case_id}.nii.gz").read_bytes()
    # the training transforms load the new pair and draw patches from it
    patch = train_transforms((16, 16, 16), 2, Normalization())(dict(new[flagged[0]]))
    assert patch[0]["image"].shape == (1, 16, 16, 16) and patch[0]["label"].max() <= 1
    meta = (msd / "dataset.json").read_bytes()
    assert json.loads(meta)["numTraining"] == before + 2

    # the same corrections again: nothing changes
    assert main([*args, "--data", str(msd)]) == 0
    assert "2 unchanged" in capsys.readouterr().out
    assert (msd / "dataset.json").read_bytes() == meta

    # a second correction of one case replaces its label, and only its label
    fixed = labels / f"{flagged[0]}.nii.gz"
    img = nib.load(fixed)
    nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine), fixed)
    assert main([*args, "--data", str(msd)]) == 0
    assert "1 replaced" in capsys.readouterr().out
    ds = validate_dataset(read_dataset(msd))
    assert len(ds.training) == before + 2
    assert Path(new[flagged[0]]["label"]).read_bytes() == fixed.read_bytes()


def test_a_bad_or_unflagged_correction_adds_nothing(
    cohort: Path, table: Path, msd: Path, tmp_path: Path, capsys
) -> None:
    flagged = _flagged(table)
    unflagged = next(c for c in _frame(table).index if c not in flagged)
    labels = _corrections(cohort, tmp_path / "corrected", [flagged[0], unflagged])
    state = {p: p.read_bytes() for p in sorted(msd.rglob("*")) if p.is_file()}
    args = ["data", "add-corrections", "--table", str(table), "--labels", str(labels)]
    assert main([*args, "--data", str(msd)]) == 2
    err = capsys.readouterr().err
    assert f"case '{unflagged}' is not flagged" in err and "Nothing was added" in err, err

    # a label off the image's grid and outside the classes: refused with both reasons
    (labels / f"{unflagged}.nii.gz").unlink()
    bad = nib.load(labels / f"{flagged[0]}.nii.gz")
    data = np.asarray(bad.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, bad.affine), labels / f"{flagged[0]}.nii.gz")
    small = np.zeros((20, 20, 20), np.uint8)
    nib.save(nib.Nifti1Image(small, bad.affine), labels / f"{flagged[1]}.nii.gz")
    assert main([*args, "--data", str(msd)]) == 2
    err = capsys.readouterr().err
    assert "label values [7] outside 0..1" in err and "!= label shape (20, 20, 20)" in err, err
    assert {p: p.read_bytes() for p in sorted(msd.rglob("*")) if p.is_file()} == state


def test_two_add_corrections_on_one_data_folder_at_once_are_refused(tmp_path: Path) -> None:
    from clinbundle.cohort.atomic import exclusive
    from clinbundle.runtime.errors import ClinbundleError
    from clinbundle.training.corrections import DATASET_JSON, add_corrections

    (tmp_path / DATASET_JSON).write_text("{}")
    refused = pytest.raises(ClinbundleError, match="another `clinbundle data add-corrections`")
    with exclusive(tmp_path, "held by the first run", DATASET_JSON), refused:
        add_corrections(tmp_path / "predictions.parquet", tmp_path / "labels", tmp_path)
