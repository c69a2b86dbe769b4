"""The MAP app on DICOM as it arrives (issue 13, items 6 and 7), and on bad NIfTI input.

The app runs as a real process from the checkout (`python -m clinbundle.apps.map_app`) on an
ONNX bundle built from the session champion with a contract that carries a modality (CT) and
a SNOMED CT code for its label; no app.yaml unless a test says so, so the selection rules come
from the contract (the app's default path; the MAP's app.yaml path is in test_map.py).
SEGs are validated with dicom3tools' `dciodvfy` (`make system-deps` installs it).
"""

from __future__ import annotations

import dataclasses
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
import yaml
from pydicom import dcmread

from clinbundle.packaging.dicom_synth import (
    SeriesGeometry,
    SeriesInfo,
    quantize_hu,
    write_ct_series,
)
from clinbundle.packaging.map_bundle import read_seg_labels
from clinbundle.runtime.bundle_reader import load_bundle
from clinbundle.runtime.contract import CodedConcept
from clinbundle.training.synth import synthesize_volume

from conftest import REPO, earlier_seg

VESSEL = CodedConcept(scheme="SCT", value="59820001", meaning="Blood vessel")
SLOPE, INTERCEPT = 2.0, -1024.0
CT5N = Path(pydicom.__file__).parent / "data/test_files/dicomdirtests/98892001/CT5N"


@pytest.fixture(scope="module")
def coded_bundle(packaged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The champion's ONNX bundle, built from its contract with a modality and a label code."""
    from clinbundle.packaging.onnx_bundle import build_onnx_bundle

    contract = packaged.model.contract.model_copy(
        update={"modality": "CT", "label_codes": {"1": VESSEL}}
    )
    model = dataclasses.replace(packaged.model, contract=contract)
    out = tmp_path_factory.mktemp("coded") / "bundle"
    build_onnx_bundle(model, out, device="cpu", record=False)
    return out


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return synthesize_volume((40, 36, 16), np.random.default_rng(5))[0]


def _stack_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 32 * 1024 * 1024 if hard == resource.RLIM_INFINITY else min(32 * 1024 * 1024, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def _app(bundle: Path, inp: Path, out: Path, config: dict | None = None) -> tuple[list, dict]:
    cmd = [sys.executable, "-m", "clinbundle.apps.map_app", "-i", str(inp), "-o", str(out)]
    cmd += ["-m", str(bundle)]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    env.pop("HOLOSCAN_CONFIG_PATH", None)
    if config is not None:
        path = out.parent / "app.yaml"
        path.write_text(yaml.safe_dump({"clinbundle": config}))
        env["HOLOSCAN_CONFIG_PATH"] = str(path)
    return cmd, env


def run_app(
    bundle: Path, inp: Path, out: Path, config: dict | None = None
) -> subprocess.CompletedProcess:
    out.mkdir(parents=True, exist_ok=True)
    cmd, env = _app(bundle, inp, out, config)
    return subprocess.run(
        cmd,
        env=env,
        cwd=out.parent,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_stack_limit,
        check=False,
    )


def dciodvfy_errors(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    assert exe, "dciodvfy (Debian's dicom3tools) is missing: run `make system-deps`"
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
    lines = (proc.stdout + proc.stderr).splitlines()
    assert any(line.strip() == "Segmentation" for line in lines), lines  # it did read a SEG
    return [line for line in lines if line.startswith("Error")]


def _one_seg(out: Path) -> Path:
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].suffix == ".dcm", files
    return files[0]


def test_ct_rescale_slope_and_intercept_give_hu(volume: np.ndarray, tmp_path: Path) -> None:
    """The app's series-to-volume operator, on the SDK's own loaded series, gives HU for
    RescaleSlope 2 / RescaleIntercept -1024, also when the first slice holds only positive
    values (the SDK's operator then makes a uint16 volume and wraps every negative HU)."""
    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import (
        DICOMSeriesSelectorOperator,
    )

    from clinbundle.apps.map_app.operators import HUSeriesToVolumeOperator
    from clinbundle.apps.map_app.selection import series_rules

    hu = volume.copy()
    hu[:, :, 0] = np.abs(hu[:, :, 0]) + 10  # first slice all positive
    hu[:4, :4, 1:] = -1000  # air in every later slice
    write_ct_series(hu, tmp_path / "in", rescale=(SLOPE, INTERCEPT))
    stored = dcmread(next((tmp_path / "in").iterdir()))
    assert float(stored.RescaleSlope) == SLOPE and float(stored.RescaleIntercept) == INTERCEPT

    fragment = Fragment()
    studies = DICOMDataLoaderOperator(
        fragment, input_folder=tmp_path / "in", name="loader"
    ).load_data_to_studies(tmp_path / "in")
    rules = series_rules("CT")
    selected = DICOMSeriesSelectorOperator(fragment, name="selector").filter(rules, studies)
    image = HUSeriesToVolumeOperator(fragment, name="to_volume").convert_to_image(selected)
    got = np.transpose(image.asnumpy(), (2, 1, 0))  # [slice, row, column] -> [i, j, k]
    assert got.dtype == np.float32
    expected = quantize_hu(hu, SLOPE, INTERCEPT)
    np.testing.assert_array_equal(got, expected)
    assert got.min() == -1000 and np.abs(expected - hu).max() <= SLOPE / 2 + 1e-3


@pytest.mark.slow
def test_study_with_several_series_gives_a_coded_valid_seg_of_the_chosen_one(
    coded_bundle: Path, volume: np.ndarray, tmp_path: Path
) -> None:
    """One study: a localizer, the CT (slope 2), a second reconstruction with fewer slices and
    an earlier SEG. The app segments the CT, says why it skipped each other series, and writes
    a SEG that dciodvfy accepts, coded from the contract, with the source's identity."""
    study = hd.UID()
    info = {"study_uid": study, "patient_id": "PAT-42"}
    inp = tmp_path / "in"
    write_ct_series(
        volume[:, :, :1],
        inp / "scout",
        info=SeriesInfo(
            series_number=1,
            series_description="scout",
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            **info,
        ),
    )
    ct = SeriesInfo(series_number=2, series_description="CT 1.5 mm", **info)
    files = write_ct_series(volume, inp / "ct", info=ct, rescale=(SLOPE, INTERCEPT))
    recon = SeriesInfo(series_number=3, series_description="CT 3 mm", **info)
    write_ct_series(
        volume[:, :, ::2],
        inp / "recon",
        SeriesGeometry(spacing=(0.8, 0.7, 3.0)),
        info=recon,
    )
    (inp / "seg").mkdir(parents=True)
    earlier_seg(files, inp / "seg" / "seg.dcm")

    proc = run_app(coded_bundle, inp, tmp_path / "out")
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    assert f"segmenting series 2 {ct.series_uid}" in log
    assert "skipped series 1 " in log and "marks a localizer" in log
    assert f"skipped series 3 {recon.series_uid}" in log and "another candidate" in log
    assert "skipped series 50 " in log and "Modality SEG does not match the rules" in log

    seg_path = _one_seg(tmp_path / "out")
    assert dciodvfy_errors(seg_path) == []
    seg = hd.seg.segread(seg_path)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    source = dcmread(files[0], stop_before_pixels=True)
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyID", "StudyDate"):
        assert seg.get(keyword) == source.get(keyword), keyword
    segment = seg.SegmentSequence[0]
    [type_code] = segment.SegmentedPropertyTypeCodeSequence
    assert (type_code.CodingSchemeDesignator, type_code.CodeValue, type_code.CodeMeaning) == (
        VESSEL.scheme,
        VESSEL.value,
        VESSEL.meaning,
    )
    bundle = load_bundle(coded_bundle, "cpu")
    model = bundle.manifest["model"]
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
        model["name"],
        str(model["version"]),
    )
    assert segment.SegmentAlgorithmName == model["name"]
    assert seg.ManufacturerModelName == model["name"]

    # the labels are the bundle's on the HU volume (zscore would hide a missing rescale; the
    # HU values themselves are checked in the rescale test)
    labels = read_seg_labels(seg_path, files)
    hu = quantize_hu(volume, SLOPE, INTERCEPT)
    geometry = SeriesGeometry()  # write_ct_series' default: 0.8 x 0.7 x 1.5 mm
    expected = bundle.predict(hu[None, None], geometry.affine_ras(), "labels")[0]
    np.testing.assert_array_equal(labels, expected)
    assert labels.sum() > 0


@pytest.mark.slow
def test_real_ct_series_gives_a_valid_seg_with_its_patient_and_study(
    coded_bundle: Path, tmp_path: Path
) -> None:
    """pydicom's real 5-slice CT series (CT5N) -> a SEG with no dciodvfy errors."""
    assert CT5N.is_dir(), f"pydicom's test series is missing: {CT5N}"
    shutil.copytree(CT5N, tmp_path / "in")
    proc = run_app(coded_bundle, tmp_path / "in", tmp_path / "out")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    seg_path = _one_seg(tmp_path / "out")
    assert dciodvfy_errors(seg_path) == []
    seg = dcmread(seg_path)
    source = dcmread(next((tmp_path / "in").iterdir()), stop_before_pixels=True)
    for keyword in ("PatientID", "PatientName", "StudyInstanceUID", "StudyDate"):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert int(seg.NumberOfFrames) == 5
    type_code = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert type_code.CodeValue == VESSEL.value


def _positions(geometry: SeriesGeometry, steps: list[float], shift=(0.0, 0.0, 0.0)) -> list:
    along = np.concatenate([[0.0], np.cumsum(steps)])
    return [
        list(np.asarray(geometry.origin) + a * geometry.normal + i * np.asarray(shift))
        for i, a in enumerate(along)
    ]


GEOM = SeriesGeometry()
TILT = np.tan(np.deg2rad(15)) * 1.5
REFUSED = {
    "missing_slice": (
        {"slices": [0, 1, 2, 3, 5, 6, 7, 8, 9]},
        "missing slice(s) (spacing 1.500 mm; 1 missing between",
    ),
    "uneven_spacing": (
        {"slices": range(10), "positions": _positions(GEOM, [1.5] * 4 + [2.0] * 5)},
        "slice spacing is not uniform",
    ),
    "tilted_gantry": (
        {"slices": range(10), "positions": _positions(GEOM, [1.5] * 9, (0.0, TILT, 0.0))},
        "not along the normal of ImageOrientationPatient (tilted gantry",
    ),
    "one_slice": ({"slices": [4]}, "1 slice(s); a volume needs at least 2"),
    "strict_two_series": ({}, "series-strict: true"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(REFUSED))
def test_irregular_series_is_refused_before_the_graph(
    coded_bundle: Path, volume: np.ndarray, tmp_path: Path, case: str
) -> None:
    kwargs, message = REFUSED[case]
    info = SeriesInfo(series_description=case)
    config = None
    if case == "strict_two_series":
        write_ct_series(volume[:, :, :10], tmp_path / "in" / "a", info=info)
        write_ct_series(volume[:, :, :6], tmp_path / "in" / "b", info=SeriesInfo())
        config = {"series-strict": True}
    else:
        write_ct_series(volume[:, :, :10], tmp_path / "in", GEOM, info, **kwargs)
    proc = run_app(coded_bundle, tmp_path / "in", tmp_path / "out", config)
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert message in proc.stderr, proc.stderr[-3000:]
    assert info.series_uid in proc.stderr  # the message names the series
    assert "Graph execution" not in proc.stdout + proc.stderr  # refused before the graph
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.slow
def test_killed_run_leaves_nothing_in_the_way_and_same_names_never_collide(
    coded_bundle: Path, volume: np.ndarray, tmp_path: Path
) -> None:
    """A run killed mid-way (SIGKILL once its staging folder exists), plus a `.partial-1`
    left by a container run (the app is PID 1 there), do not stop the next run, which keeps
    `a/scan` and `b/scan` apart and publishes nothing of the dead runs."""
    inp, out = tmp_path / "in", tmp_path / "out"
    affine = np.diag([0.8, 0.7, 1.5, 1.0])
    for sub, vol in (("a", volume), ("b", volume[::-1].copy())):
        (inp / sub).mkdir(parents=True)
        nib.save(nib.Nifti1Image(vol, affine), inp / sub / "scan.nii.gz")
    out.mkdir()
    (out / ".partial-1").mkdir()
    (out / ".partial-1" / "scan_seg.nii.gz").write_bytes(b"half a file")

    cmd, env = _app(coded_bundle, inp, out)
    killed = subprocess.Popen(
        cmd,
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_stack_limit,
    )

    def own_staging() -> list[Path]:
        return [p for p in out.glob(".partial-*") if p.name != ".partial-1"]

    deadline = time.monotonic() + 300
    while killed.poll() is None and not own_staging() and time.monotonic() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert own_staging(), "the run was killed before it made its staging folder"
    assert not list(out.glob("**/*_seg.nii.gz")), "a killed run published output"

    proc = run_app(coded_bundle, inp, out)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    found = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert found == ["a/scan_seg.nii.gz", "b/scan_seg.nii.gz"]
    assert not list(out.glob(".partial-*"))
    bundle = load_bundle(coded_bundle, "cpu")
    for sub, vol in (("a", volume), ("b", volume[::-1].copy())):
        labels = np.asarray(nib.load(out / sub / "scan_seg.nii.gz").dataobj)
        expected = bundle.predict(vol[None, None], affine, "labels")[0]
        np.testing.assert_array_equal(labels, expected)


def _bad_niftis(volume: np.ndarray, folder: Path) -> dict[str, str]:
    """file -> the problem the app must name."""
    folder.mkdir(parents=True)
    eye = np.diag([0.8, 0.7, 1.5, 1.0])
    nib.save(nib.Nifti1Image(volume[:, :, :1], eye), folder / "flat.nii.gz")
    nib.save(nib.Nifti1Image(volume[:, :, 0], eye), folder / "image2d.nii.gz")
    nan = volume.copy()
    nan[3, 4, 5] = np.nan
    nib.save(nib.Nifti1Image(nan, eye), folder / "nan.nii.gz")
    singular = eye.copy()
    singular[:3, 1] = singular[:3, 0]  # two axes along the same direction
    nib.save(nib.Nifti1Image(volume, singular), folder / "singular.nii")
    (folder / "sub").mkdir()
    img = nib.Nifti1Image(volume, eye)
    img.header["pixdim"][1:4] = [0.8, 0.0, 1.5]
    nib.save(img, folder / "sub" / "zero_spacing.nii.gz")
    nonfinite = eye.copy()
    nonfinite[0, 3] = np.inf
    img = nib.Nifti1Image(volume, eye)
    img.set_sform(nonfinite, code=1)  # nibabel does not check what it stores
    nib.save(img, folder / "inf_affine.nii.gz")
    return {
        "flat.nii.gz": "is not a volume (a 2-D image?)",
        "image2d.nii.gz": "expected a 3-D volume, got shape (40, 36)",
        "nan.nii.gz": "1 voxel(s) are NaN or infinite",
        "singular.nii": "the affine is singular",
        "sub/zero_spacing.nii.gz": "voxel spacing [0.8",
        "inf_affine.nii.gz": "the affine has non-finite values",
    }


@pytest.mark.slow
def test_bad_nifti_input_is_refused_naming_each_file(
    coded_bundle: Path, volume: np.ndarray, tmp_path: Path
) -> None:
    expected = _bad_niftis(volume, tmp_path / "in")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "in" / "good.nii.gz")
    proc = run_app(coded_bundle, tmp_path / "in", tmp_path / "out")
    assert proc.returncode == 2, (proc.stdout + proc.stderr)[-3000:]
    assert f"{len(expected)} NIfTI file(s)" in proc.stderr
    lines = proc.stderr.splitlines()
    for name, problem in expected.items():
        assert any(f"- {name}: " in line and problem in line for line in lines), (name, lines)
    assert "good.nii.gz" not in proc.stderr
    assert list((tmp_path / "out").iterdir()) == []
