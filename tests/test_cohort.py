"""`clinbundle predict` over a folder (issue 17, item 1): the session's ONNX bundle through its
runtime on a cohort of the session's synthetic volumes (mixed spacings and orientations) plus
one corrupt file; resumable manifest, table, flags, the MLflow batch run."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from clinbundle.cli import main
from clinbundle.cohort.atomic import TEMP_PREFIX, exclusive
from clinbundle.cohort.batch import EXPERIMENT, VERSION_TAG
from clinbundle.cohort.cases import Case, discover, files_sha256, read_case
from clinbundle.cohort.job import uncertainty
from clinbundle.cohort.manifest import MANIFEST, append_row, is_final, read_manifest
from clinbundle.cohort.table import flag_worst
from clinbundle.runtime.bundle_reader import load_bundle
from clinbundle.runtime.errors import ClinbundleError, InputError

CORRUPT = "corrupt"
RUNTIME = "onnxruntime"  # the session bundle's default may be another measured runtime


@dataclass
class FirstRun:
    input: Path
    output: Path
    workdir: Path
    bundle: Path
    rc: int
    stdout: str
    table: pd.DataFrame
    manifest: bytes


def _cohort(data: Path, folder: Path) -> Path:
    """Five of the session's volumes (nested folders: any layout) and one truncated .nii.gz
    whose header still reads: only loading its voxels finds it corrupt."""
    images = (
        sorted((data / "imagesTr").glob("*.nii.gz"))[:3]
        + sorted((data / "imagesTs").glob("*.nii.gz"))[:2]
    )
    for n, src in enumerate(images):
        dest = folder / ("site-a" if n % 2 else "site-b") / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dest)
    raw = images[0].read_bytes()
    (folder / f"{CORRUPT}.nii.gz").write_bytes(raw[: len(raw) // 3])
    return folder


def _predict(*args: str) -> int:
    return main(["predict", *map(str, args)])


@pytest.fixture(scope="module")
def first_run(packaged, tmp_path_factory: pytest.TempPathFactory) -> FirstRun:
    root = tmp_path_factory.mktemp("cohort")
    src = _cohort(packaged.trained.data, root / "in")
    out, wd = root / "out", packaged.trained.workdir
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = _predict(
            "--bundle", packaged.bundle, "--input", src, "--output", out, "--workdir", wd,
            "--device", "cpu", "--runtime", RUNTIME, "--flag-worst", 2,
        )  # fmt: skip
    table = pd.read_parquet(out / "predictions.parquet")
    manifest = (out / MANIFEST).read_bytes()
    return FirstRun(src, out, wd, packaged.bundle, rc, stdout.getvalue(), table, manifest)


def _outputs(run: FirstRun) -> dict[str, int]:
    """Output file -> mtime (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in sorted(run.output.glob("*_seg.nii.gz"))}


def test_a_cohort_gives_five_outputs_and_names_the_corrupt_case(first_run: FirstRun) -> None:
    t = first_run.table
    assert first_run.rc == 0
    assert "6 case(s): 5 done, 1 failed (6 run now" in first_run.stdout
    assert len(t) == 6 and t["case_id"].is_unique
    done, failed = t[t.status == "done"], t[t.status == "failed"]
    assert len(done) == 5 and list(failed.case_id) == [CORRUPT]
    assert "corrupt.nii.gz: the image data cannot be read" in failed.error.iloc[0]
    assert failed.output.iloc[0] == "" and failed.uncertainty.isna().all()
    assert sorted(_outputs(first_run)) == sorted(done.output)
    assert set(t.runtime) == {RUNTIME}
    # every done case: a label map on its input's grid, label volumes in mL from its voxel size
    for row in done.itertuples():
        src = Path(row.input)
        image, seg = nib.load(src), nib.load(first_run.output / row.output)
        assert seg.shape == image.shape and seg.get_data_dtype() == np.uint8
        np.testing.assert_allclose(seg.affine, image.affine, atol=1e-6)
        labels = np.asarray(seg.dataobj)
        voxel_ml = abs(np.linalg.det(image.affine[:3, :3])) / 1000
        assert row.volume_ml_vessel == pytest.approx((labels == 1).sum() * voxel_ml)
        assert row.volume_ml_vessel > 0 and row.uncertainty > 0
        assert row.shape == "x".join(map(str, image.shape))
        assert row.content_hash == files_sha256([src])
    csv = pd.read_csv(first_run.output / "predictions.csv")
    assert list(csv.columns) == list(t.columns)


def test_flag_worst_marks_the_two_most_uncertain_done_cases(first_run: FirstRun) -> None:
    t = first_run.table
    done = t[t.status == "done"]
    worst = set(done.nlargest(2, "uncertainty").case_id)
    assert set(t[t.flagged].case_id) == worst
    assert done.uncertainty.nunique() == 5, "distinct scores, so the flags are not a tie-break"


def test_an_output_equals_the_bundle_through_segment(first_run: FirstRun) -> None:
    """One case checked against the bundle itself (its runtime, the one inference path)."""
    row = first_run.table[first_run.table.status == "done"].iloc[0]
    img = nib.load(row.input)
    image = np.asarray(img.dataobj, dtype=np.float32)[None, None]
    bundle = load_bundle(first_run.bundle, "cpu", runtime=RUNTIME)
    expected = bundle.predict(image, img.affine, "labels")[0]
    got = np.asarray(nib.load(first_run.output / row.output).dataobj)
    np.testing.assert_array_equal(got, expected)
    probs = bundle.predict(image, img.affine, "probabilities")[0]
    assert row.uncertainty == pytest.approx(uncertainty(probs, expected), rel=1e-5)


def test_the_batch_run_is_in_mlflow_and_linked_to_the_version(
    first_run: FirstRun, packaged
) -> None:
    t = packaged.trained
    mlflow.set_tracking_uri(t.tracking_uri)
    client = MlflowClient(t.tracking_uri)
    run_id = first_run.stdout.split("MLflow run ")[1].split()[0]
    run = client.get_run(run_id)
    assert client.get_experiment(run.info.experiment_id).name == EXPERIMENT
    assert run.info.run_name == f"predict {t.name} v{t.version}"
    assert run.data.tags["model_name"] == t.name and run.data.tags["model_version"] == t.version
    assert run.data.tags["runtime"] == RUNTIME and run.data.tags["engine"] == "local"
    assert run.data.metrics["cases_done"] == 5 and run.data.metrics["cases_failed"] == 1
    assert run.data.metrics["cases_per_min"] > 0
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"predictions.parquet", "predictions.csv", "summary.json"} <= names
    logged = pd.read_parquet(
        mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="predictions.parquet"
        )
    )
    pd.testing.assert_frame_equal(logged, first_run.table)
    version = client.get_model_version(t.name, t.version)
    assert version.tags[VERSION_TAG] == run_id
    assert set(first_run.table.model_version) == {t.version}


def test_predict_with_model_runs_pytorch_and_agrees_with_the_bundle(
    first_run: FirstRun, packaged, tmp_path: Path
) -> None:
    t = packaged.trained
    row = first_run.table[first_run.table.status == "done"].iloc[1]
    (tmp_path / "in").mkdir()
    shutil.copy(row.input, tmp_path / "in")
    rc = _predict(
        "--model", f"models:/{t.name}@champion", "--input", tmp_path / "in",
        "--output", tmp_path / "out", "--workdir", t.workdir, "--device", "cpu",
    )  # fmt: skip
    assert rc == 0
    got = pd.read_parquet(tmp_path / "out" / "predictions.parquet").iloc[0]
    assert (got.status, got.runtime, got.model_version) == ("done", "pytorch", t.version)
    assert got.content_hash == row.content_hash
    torch_labels = np.asarray(nib.load(tmp_path / "out" / got.output).dataobj)
    onnx_labels = np.asarray(nib.load(first_run.output / row.output).dataobj)
    assert (torch_labels == onnx_labels).mean() > 0.999  # near-tie voxels may flip
    assert got.volume_ml_vessel == pytest.approx(row.volume_ml_vessel, rel=0.02)


def test_bad_arguments_exit_2_before_any_work(
    first_run: FirstRun, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    common = ["--bundle", first_run.bundle, "--workdir", first_run.workdir]
    assert _predict(*common, "--input", tmp_path / "nope", "--output", tmp_path / "o") == 2
    assert "nope does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert _predict(*common, "--input", tmp_path / "empty", "--output", tmp_path / "o") == 2
    assert "holds no cases" in capsys.readouterr().err
    inside = first_run.input / "preds"
    assert _predict(*common, "--input", first_run.input, "--output", inside) == 2
    assert "is inside --input" in capsys.readouterr().err
    args = ["--input", first_run.input, "--output", tmp_path / "o"]
    assert _predict(*common, *args, "--study", "1.2.3") == 2
    assert "--dicomweb" in capsys.readouterr().err
    assert _predict(*common, *args, "--flag-worst", "-1") == 2
    with pytest.raises(SystemExit) as e:  # argparse: --model and --bundle together
        _predict("--model", "x", *common, *args)
    assert e.value.code == 2
    assert not (tmp_path / "o").exists() and not inside.exists()


def test_a_missing_ray_engine_is_exit_2(
    first_run: FirstRun, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "clinbundle.cohort.ray_engine", None)  # not installed
    args = ["--bundle", first_run.bundle, "--input", first_run.input, "--output", tmp_path / "o"]
    assert _predict(*args, "--workdir", first_run.workdir, "--engine", "ray") == 2
    assert "the Ray engine is not installed" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_second_run_does_nothing_and_a_deleted_output_is_redone(first_run: FirstRun) -> None:
    """Runs last in this module: it changes the first run's output folder."""
    args = [
        "--bundle", first_run.bundle, "--input", first_run.input, "--output", first_run.output,
        "--workdir", first_run.workdir, "--device", "cpu", "--runtime", RUNTIME, "--flag-worst", 2,
    ]  # fmt: skip
    before = _outputs(first_run)
    assert _predict(*args) == 0
    assert (first_run.output / MANIFEST).read_bytes() == first_run.manifest  # no case re-run
    assert _outputs(first_run) == before
    again = pd.read_parquet(first_run.output / "predictions.parquet")
    pd.testing.assert_frame_equal(again, first_run.table)

    gone = first_run.table[first_run.table.status == "done"].iloc[2]
    (first_run.output / gone.output).unlink()
    (first_run.output / f"{TEMP_PREFIX}x_seg.nii.gz-abc.nii.gz").write_bytes(b"half")  # killed
    assert _predict(*args) == 0
    lines = (first_run.output / MANIFEST).read_bytes()
    assert lines.startswith(first_run.manifest)
    redone = [json.loads(x) for x in lines[len(first_run.manifest) :].splitlines()]
    assert [r["case_id"] for r in redone] == [gone.case_id] and redone[0]["status"] == "done"
    after = _outputs(first_run)
    assert sorted(after) == sorted(before)
    assert {k: v for k, v in after.items() if k != gone.output} == {
        k: v for k, v in before.items() if k != gone.output
    }
    assert not list(first_run.output.glob(f"{TEMP_PREFIX}*"))

    # --retry-failed runs the corrupt case (and only it) again
    n = len(lines.splitlines())
    assert _predict(*args, "--retry-failed") == 0
    new = (first_run.output / MANIFEST).read_text().splitlines()[n:]
    assert [json.loads(x)["case_id"] for x in new] == [CORRUPT]


# ---------------------------------------------------------------- parts, no model needed


def test_uncertainty_is_mean_foreground_entropy() -> None:
    probs = np.zeros((2, 2, 2, 2), np.float32)
    probs[0], probs[1] = 1.0, 0.0  # certain background everywhere...
    probs[:, 0, 0, 0] = (0.5, 0.5)  # ...but one voxel at a coin toss (predicted background)
    probs[:, 1, 1, 1] = (0.2, 0.8)  # and two foreground voxels
    probs[:, 1, 1, 0] = (0.0, 1.0)
    labels = probs.argmax(0).astype(np.uint8)
    h = -(0.2 * np.log(0.2) + 0.8 * np.log(0.8))
    assert uncertainty(probs, labels) == pytest.approx((h + 0.0) / 2, rel=1e-6)
    assert uncertainty(probs, np.zeros_like(labels)) == 0.0


def test_flag_worst_skips_failed_cases_and_unflags_the_rest() -> None:
    rows = [
        {"case_id": "a", "status": "done", "uncertainty": 0.1, "flagged": True},
        {"case_id": "b", "status": "failed", "uncertainty": None},
        {"case_id": "c", "status": "done", "uncertainty": 0.3},
        {"case_id": "d", "status": "done", "uncertainty": 0.2},
    ]
    flag_worst(rows, 2)
    assert [r["flagged"] for r in rows] == [False, False, True, True]
    flag_worst(rows, 10)
    assert [r["flagged"] for r in rows] == [True, False, True, True]


def test_manifest_keeps_final_rows_redoes_the_rest_and_survives_a_torn_line(
    tmp_path: Path,
) -> None:
    (tmp_path / "a_seg.nii.gz").write_bytes(b"x")

    def row(case: str, status: str, kind: str = "", output: str = "") -> dict:
        return {"case_id": case, "content_hash": case * 4, "model_version": "3",
                "runtime": "onnxruntime", "status": status, "error_kind": kind, "output": output}  # fmt: skip

    rows = {
        "done": row("a", "done", output="a_seg.nii.gz"),
        "done, output deleted": row("b", "done", output="b_seg.nii.gz"),
        "bad input": row("c", "failed", "input"),
        "runtime failure": row("d", "failed", "runtime"),
    }
    for r in rows.values():
        append_row(tmp_path, r)
    with (tmp_path / MANIFEST).open("a") as f:
        f.write('{"case_id": "e", "content_ha')  # the job was killed mid-line
    append_row(tmp_path, row("a", "done", output="a_seg.nii.gz") | {"seconds": 2})
    known = read_manifest(tmp_path)
    assert len(known) == 4 and known[("aaaa", "3", "onnxruntime")]["seconds"] == 2  # last wins
    final = {k: is_final(r, tmp_path) for k, r in rows.items()}
    assert final == {
        "done": True,
        "done, output deleted": False,
        "bad input": True,
        "runtime failure": False,
    }
    assert not is_final(rows["bad input"], tmp_path, retry_failed=True)
    assert not is_final(None, tmp_path)


def test_a_header_that_declares_too_many_voxels_is_refused_before_reading(tmp_path: Path) -> None:
    """A few hundred bytes that declare 4000^3 int16 voxels (128 GB): refused from the header."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    path = tmp_path / "bomb.nii"
    path.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\0" * 64)
    case = Case("bomb", "nifti", (path,), files_sha256([path]))
    with pytest.raises(InputError, match="bomb.nii: 4000x4000x4000 voxels exceed the limit"):
        read_case(case)


def test_discover_names_cases_by_stem_and_disambiguates_clashes(tmp_path: Path) -> None:
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    for rel in ("x/scan.nii.gz", "y/scan.nii.gz", "other.nii"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, tmp_path / rel)
    (tmp_path / "notes.txt").write_text("not a case")
    (tmp_path / "endless.nii").symlink_to("/dev/zero")  # hashing it would never end
    cases = discover(tmp_path)
    assert [c.case_id for c in cases] == ["other", "x__scan", "y__scan"]
    assert (
        cases[1].content_hash == cases[2].content_hash == files_sha256([tmp_path / "x/scan.nii.gz"])
    )


def test_one_job_per_output_folder(tmp_path: Path) -> None:
    first = exclusive(tmp_path)
    first.__enter__()
    with pytest.raises(ClinbundleError, match="another `clinbundle predict`"), exclusive(tmp_path):
        pass
    first.__exit__(None, None, None)
    with exclusive(tmp_path):  # released when the first job ends
        pass


def test_bad_nifti_cases_fail_with_the_maps_reasons(tmp_path: Path) -> None:
    """The MAP's checks (runtime/nifti_check, shared): each bad file is a reason, not a crash."""
    vol, eye = np.ones((8, 8, 8), np.float32), np.diag([0.8, 0.7, 1.5, 1.0])
    rgb = [("R", "u1"), ("G", "u1"), ("B", "u1")]
    nan = vol.copy()
    nan[1, 2, 3] = np.nan
    singular = eye.copy()
    singular[:3, 1] = singular[:3, 0]
    zero = nib.Nifti1Image(vol, eye)
    zero.header["pixdim"][1:4] = [0.8, 0.0, 1.5]
    files = {
        "flat.nii.gz": (nib.Nifti1Image(vol[:, :, :1], eye), "is not a volume"),
        "image2d.nii.gz": (nib.Nifti1Image(vol[:, :, 0], eye), "expected a 3-D volume"),
        "nan.nii.gz": (nib.Nifti1Image(nan, eye), "1 voxel(s) are NaN or infinite"),
        "singular.nii": (nib.Nifti1Image(vol, singular), "the affine is singular"),
        "zero.nii.gz": (zero, "voxel spacing [0.8, 0.0, 1.5] must be finite and positive"),
        "rgb.nii": (nib.Nifti1Image(np.zeros((4, 4, 4), rgb), eye), "is not a number"),
    }
    for name, (img, _reason) in files.items():
        nib.save(img, tmp_path / name)
    for case in discover(tmp_path):
        name = case.files[0].name
        with pytest.raises(InputError, match=re.escape(f"{name}: ")) as e:
            read_case(case)
        assert files[name][1] in str(e.value), str(e.value)
