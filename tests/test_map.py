"""The MONAI Deploy MAP: build context, the app as a real process on NIfTI and DICOM, bad input.

One MAP is built per module from the session champion (through the CLI) and its app is run as
the MAP runtime runs it (`python app -i -o -m`), offline (`unshare --net`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import mlflow
import nibabel as nib
import numpy as np
import pytest
import yaml
from pydicom import dcmread

from clinbundle.apps.map_app.selection import series_rules
from clinbundle.cli import main
from clinbundle.packaging.dicom_synth import (
    SeriesInfo,
    oblique,
    quantize_hu,
    write_ct_series,
)
from clinbundle.packaging.map_bundle import read_seg_labels, run_map
from clinbundle.packaging.onnx_bundle import verify_bundle
from clinbundle.packaging.parity import ParityCase, Tolerances, check_parity
from clinbundle.packaging.runtimes import torch_runtime
from clinbundle.runtime.bundle_reader import check_hashes, load_bundle, read_manifest
from clinbundle.runtime.errors import BundleError
from clinbundle.runtime.runners import Runtime
from clinbundle.training.synth import synthesize_volume

from conftest import package_champion

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def map_dir(packaged, tmp_path_factory: pytest.TempPathFactory) -> Path:
    t = packaged.trained
    out = tmp_path_factory.mktemp("map") / "ctx"
    # nests the session's ONNX bundle (every runtime measured), as `quickstart --package` does
    assert package_champion(t, "map", out, "--onnx-bundle", str(packaged.bundle)) == 0
    return out


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    """An awkward shape (no multiple of 8 or of the roi), raw CT-like intensities."""
    return synthesize_volume((45, 38, 29), np.random.default_rng(11))[0]


def _run(
    map_dir: Path, tmp: Path, inp: Path, via_env: bool = False
) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp / "out"
    out.mkdir()
    return run_map(map_dir, inp, out, offline=True, via_env=via_env), out


def test_unshare_net_works_here() -> None:
    """The offline runs below rely on a network namespace; say so if this machine has none."""
    proc = subprocess.run(["unshare", "--net", "true"], capture_output=True, text=True)
    assert proc.returncode == 0, f"unshare --net is not available: {proc.stderr}"


def test_build_context_follows_the_map_layout(map_dir: Path, packaged) -> None:
    from holoscan_cli.packager.config_reader import ApplicationConfiguration

    name = packaged.model.name
    for rel in ("app/__main__.py", "app/clinbundle/apps/map_app/app.py", "Dockerfile"):
        assert (map_dir / rel).is_file(), rel
    assert (map_dir / "models" / name / "model.onnx").is_file()
    assert not list(map_dir.rglob("__pycache__"))

    config = ApplicationConfiguration()
    config.read(map_dir / "app.yaml")  # the packager's own validation: application + resources
    app_yaml = yaml.safe_load((map_dir / "app.yaml").read_text())
    assert app_yaml["application"]["input-formats"] == ["file"]
    assert app_yaml["resources"]["memory"]
    # the selection rules come from the contract's modality (None here: any image series)
    rules = app_yaml["clinbundle"]["series-selection"]
    assert rules == series_rules(packaged.model.contract.modality)

    app = json.loads((map_dir / "map" / "app.json").read_text())
    assert json.loads(app["command"]) == ["python3", "/opt/holoscan/app"]
    env = app["environment"]
    assert env["HOLOSCAN_MODEL_PATH"] == "/opt/holoscan/models"
    assert env["HOLOSCAN_CONFIG_PATH"] == "/var/holoscan/app.yaml"
    assert env["HOLOSCAN_APP_MANIFEST_PATH"] == "/etc/holoscan/app.json"
    assert app["input"]["path"] == "input/" and app["output"]["path"] == "output/"
    assert app["workingDirectory"] == "/var/holoscan"
    assert app["sdk"] == "monai-deploy" and app["sdkVersion"] == "4.0.0"

    pkg = json.loads((map_dir / "map" / "pkg.json").read_text())
    assert pkg["applicationRoot"] == "/opt/holoscan/app"
    assert pkg["models"] == {name: f"/opt/holoscan/models/{name}"}
    assert pkg["resources"] == app_yaml["resources"]

    reqs = (map_dir / "pip" / "requirements.txt").read_text().splitlines()
    pins = dict(r.split("==") for r in reqs if r and not r.startswith("#"))
    assert pins["monai-deploy-app-sdk"] == "4.0.0"
    assert pins["holoscan-cu13"] == "4.2.0" and pins["holoscan-cli"] == "4.2.0"
    assert {"torch", "onnxruntime", "highdicom", "pydicom", "nibabel"} <= set(pins)

    docker = (map_dir / "Dockerfile").read_text()
    assert "ARG BASE_IMAGE=" in docker and "FROM ${BASE_IMAGE}" in docker
    for line in (
        "COPY map/app.json /etc/holoscan/app.json",
        "COPY map/pkg.json /etc/holoscan/pkg.json",
        "COPY app.yaml /var/holoscan/app.yaml",
        "COPY app /opt/holoscan/app",
        f"COPY models/{name} /opt/holoscan/models/{name}",
        "ENV HOLOSCAN_INPUT_PATH=/var/holoscan/input",
        "ENV HOLOSCAN_OUTPUT_PATH=/var/holoscan/output",
        "ARG UID=1000",
        "USER $UNAME",
        'ENTRYPOINT ["python3", "/opt/holoscan/app"]',
    ):
        assert line in docker, line
    assert "ARG UNAME=holoscan" in docker
    lint = subprocess.run(
        [str(Path(sys.executable).with_name("hadolint")), str(map_dir / "Dockerfile")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr

    manifest = read_manifest(map_dir)
    assert manifest["format"] == "map" and check_hashes(map_dir, manifest) == []
    report = json.loads((map_dir / "parity" / "parity_report.json").read_text())
    assert report["passed"] and report["format"] == "map"
    names = [c["name"] for c in report["cases"]]
    assert "dicom:odd" in names and "batch2" in names
    mv = mlflow.tracking.MlflowClient().get_model_version(
        packaged.model.name, packaged.model.version
    )
    assert mv.tags["parity_map"].startswith("pass")


def test_the_nested_onnx_bundle_is_the_one_given_and_a_wrong_one_is_refused(
    map_dir: Path, packaged, tmp_path: Path, capsys
) -> None:
    """`--onnx-bundle` nests that very bundle; a changed file or another version: exit 2, no MAP."""
    nested = map_dir / "models" / packaged.model.name
    given = read_manifest(packaged.bundle)
    assert read_manifest(nested)["files"] == given["files"]
    assert check_hashes(nested, given) == []

    changed = tmp_path / "changed"
    shutil.copytree(packaged.bundle, changed)
    with open(changed / "model.onnx", "r+b") as f:
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    other = tmp_path / "other"
    shutil.copytree(packaged.bundle, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["model"]["version"] = str(int(manifest["model"]["version"]) + 1)
    (other / "manifest.json").write_text(json.dumps(manifest))
    for bundle, why in ((changed, "model.onnx: sha256"), (other, "made from version")):
        out = tmp_path / f"map-{bundle.name}"
        capsys.readouterr()
        rc = package_champion(packaged.trained, "map", out, "--onnx-bundle", str(bundle))
        assert rc == 2 and why in capsys.readouterr().err
        assert not out.exists() and not list(tmp_path.glob(f".{out.name}*"))


def test_verify_checks_the_whole_context_then_its_onnx_bundle(
    map_dir: Path, tmp_path: Path
) -> None:
    """`clinbundle verify` on a MAP: every file's hash, then the nested bundle's own sample."""
    report = verify_bundle(map_dir, device="cpu")
    assert report.passed and [c.name for c in report.cases] == ["sample"]
    docker = (map_dir / "Dockerfile").read_text()
    assert "RUN --mount=type=bind,source=wheels,target=/tmp/wheels" in docker
    assert (map_dir / "wheels" / "README.md").is_file()

    copy = tmp_path / "ctx"
    shutil.copytree(map_dir, copy)
    app = copy / "app" / "clinbundle" / "runtime" / "inference.py"
    app.write_text(app.read_text() + "\n# changed\n")
    (copy / "wheels" / "extra.whl").write_bytes(b"not a wheel")
    with pytest.raises(BundleError) as err:
        verify_bundle(copy, device="cpu")
    assert "app/clinbundle/runtime/inference.py" in str(err.value) and "wheels/extra.whl" in str(
        err.value
    )


def test_nifti_labels_equal_the_onnx_bundle_offline(
    map_dir: Path, packaged, volume: np.ndarray, tmp_path: Path
) -> None:
    affine = np.array(
        [[0.0, -0.7, 0.0, 10.0], [0.8, 0.0, 0.0, -5.0], [0.0, 0.0, 1.5, 2.0], [0, 0, 0, 1]]
    )
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(volume, affine), tmp_path / "in" / "scan.nii.gz")
    proc, out = _run(map_dir, tmp_path, tmp_path / "in")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the MAP's own copy of clinbundle ran, not the checkout's
    assert f"from {map_dir.resolve() / 'app' / 'clinbundle'}" in proc.stdout + proc.stderr
    # the app runs the nested bundle's measured default runtime and logs it (issue 15)
    nested = json.loads(next(map_dir.glob("models/*/manifest.json")).read_text())
    assert (
        f"runtime {nested['runtimes']['default']} (the bundle's default"
        in proc.stdout + proc.stderr
    )
    assert sorted(p.name for p in out.iterdir()) == ["scan_seg.nii.gz"]
    seg = nib.load(out / "scan_seg.nii.gz")
    np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
    labels = np.asarray(seg.dataobj)
    bundle = load_bundle(map_dir / "models" / packaged.model.name, "cpu")
    expected = bundle.predict(volume[None, None], affine, output="labels")[0]
    assert labels.shape == volume.shape
    assert labels.sum() > 0, "an empty mask would make this comparison meaningless"
    np.testing.assert_array_equal(labels, expected)


def test_dicom_series_gives_a_seg_with_the_source_geometry(
    map_dir: Path, packaged, volume: np.ndarray, tmp_path: Path
) -> None:
    geometry = oblique(20.0, spacing=(0.9, 0.6, 2.0), origin=(12.0, -40.0, 7.5))
    files = write_ct_series(volume, tmp_path / "in", geometry, SeriesInfo())
    proc, out = _run(map_dir, tmp_path, tmp_path / "in", via_env=True)  # HOLOSCAN_* variables
    assert proc.returncode == 0, proc.stderr[-3000:]
    segs = list(out.iterdir())
    assert len(segs) == 1 and segs[0].suffix == ".dcm"

    seg = hd.seg.segread(segs[0])
    model = packaged.model
    assert seg.SegmentSequence[0].SegmentLabel == model.contract.labels["1"]
    # the code dataset.json gives the label (SNOMED CT "Blood vessel"), through the contract
    want = model.contract.label_codes["1"]
    type_code = seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0]
    assert (type_code.CodingSchemeDesignator, type_code.CodeValue) == (want.scheme, want.value)
    assert (want.scheme, want.value) == ("SCT", "59820001")
    dciodvfy = shutil.which("dciodvfy")
    assert dciodvfy, "dciodvfy (Debian's dicom3tools) is missing: run `make system-deps`"
    check = subprocess.run([dciodvfy, str(segs[0])], capture_output=True, text=True)
    errors = [ln for ln in (check.stdout + check.stderr).splitlines() if ln.startswith("Error")]
    assert errors == [], errors
    assert seg.SegmentSequence[0].SegmentAlgorithmName == model.name
    assert (seg.ManufacturerModelName, seg.SoftwareVersions) == (model.name, str(model.version))
    # highdicom lists the source's acquisition equipment and itself too: find the model's item
    [equipment] = [
        e for e in seg.ContributingEquipmentSequence if e.get("ManufacturerModelName") == model.name
    ]
    assert equipment.SoftwareVersions == str(model.version)
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing

    # geometry: one frame per source slice, same positions, orientation, spacing
    sources = [dcmread(f, stop_before_pixels=True) for f in files]
    assert int(seg.NumberOfFrames) == len(sources) * (model.contract.num_classes - 1)
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        shared.PlaneOrientationSequence[0].ImageOrientationPatient,
        sources[0].ImageOrientationPatient,
        atol=1e-6,
    )
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose(measures.PixelSpacing, sources[0].PixelSpacing)
    np.testing.assert_allclose(float(measures.SliceThickness), float(sources[0].SliceThickness))
    frame_positions = sorted(
        tuple(np.round(f.PlanePositionSequence[0].ImagePositionPatient, 4))
        for f in seg.PerFrameFunctionalGroupsSequence
    )
    source_positions = sorted(tuple(np.round(s.ImagePositionPatient, 4)) for s in sources)
    assert frame_positions == source_positions
    assert (seg.Rows, seg.Columns) == (sources[0].Rows, sources[0].Columns)

    # content: the SEG's segment matches PyTorch on the stored (whole-HU) volume
    labels = read_seg_labels(segs[0], files)
    stored = quantize_hu(volume)[None, None]
    reference = torch_runtime(model.load_network(), model.contract, "cpu")
    report = check_parity(
        reference,
        Runtime(lambda _v, _a: labels[None], "DICOM SEG from the MAP app"),
        [ParityCase("dicom", stored, affine=geometry.affine_ras())],
        model.contract,
        Tolerances(),
        "map-test",
    )
    assert report.passed, report.to_markdown()
    assert labels.sum() > 0


def _localizer_only(volume: np.ndarray, folder: Path) -> None:
    info = SeriesInfo(series_description="scout", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_ct_series(volume, folder, info=info)


BAD_INPUTS = {
    "empty": (lambda v, d: d.mkdir(), "is empty"),
    "not_dicom_or_nifti": (
        lambda v, d: (
            d.mkdir(),
            (d / "notes.txt").write_text("hello"),
            (d / "scan.png").write_bytes(b"\x89PNG\r\n"),
        ),
        "neither DICOM nor NIfTI",
    ),
    "series_not_selected": (_localizer_only, "no DICOM series matches"),
    "truncated_dicom": (
        lambda v, d: (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]))(
            write_ct_series(v, d)[5]
        ),
        "truncated",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_clearly_and_writes_nothing(
    map_dir: Path, volume: np.ndarray, tmp_path: Path, case: str
) -> None:
    make, message = BAD_INPUTS[case]
    make(volume[:, :, :12], tmp_path / "in")
    proc, out = _run(map_dir, tmp_path, tmp_path / "in")
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr[-3000:]
    assert list(out.iterdir()) == [], "a failed run must leave the output folder empty"


def test_run_map_cli_reports_the_exit_code(map_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    rc = main(["run-map", str(map_dir), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out")])
    assert rc == 2
    assert "is empty" in capsys.readouterr().err
    assert list((tmp_path / "out").iterdir()) == []


def test_map_segments_the_same_vessels_and_a_whole_ct_on_their_own_grids(
    map_dir: Path, trained, tmp_path: Path
) -> None:
    """Issue 13 through the MAP: the held-out vessels as stored, at 0.5 x 0.5 x 2.5 mm and
    LPS, and a 512 x 512 x 300 int16 CT, in one app run; labels come back on each grid."""
    from clinbundle.training.synth import synthetic_ct

    from conftest import assert_same_vessels, geometry_variants, mean_dice_by_variant

    variants = geometry_variants(trained.data)
    (tmp_path / "in").mkdir()
    for n, (_variant, image, _label, affine) in enumerate(variants):
        nib.save(nib.Nifti1Image(image, affine), tmp_path / "in" / f"case{n}.nii.gz")
    ct_affine = np.diag([-0.7, -0.7, 1.5, 1.0])
    nib.save(nib.Nifti1Image(synthetic_ct((512, 512, 300)), ct_affine), tmp_path / "in" / "ct.nii")
    proc, out = _run(map_dir, tmp_path, tmp_path / "in")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ct = nib.load(out / "ct_seg.nii.gz")
    assert ct.shape == (512, 512, 300)
    np.testing.assert_allclose(ct.affine, ct_affine, atol=1e-5)

    by_index = {id(image): n for n, (_v, image, _l, _a) in enumerate(variants)}

    def segment(image, affine):
        seg = nib.load(out / f"case{by_index[id(image)]}_seg.nii.gz")
        np.testing.assert_allclose(seg.affine, affine, atol=1e-5)
        return np.asarray(seg.dataobj)

    assert_same_vessels(mean_dice_by_variant(variants, segment))


def test_a_label_without_a_code_is_a_generic_anatomical_structure(packaged) -> None:
    """Never a guess from the label's text: no code in the contract -> SCT 91723000."""
    from clinbundle.apps.map_app.app import segment_descriptions

    bundle = load_bundle(packaged.bundle, "cpu")
    bundle.contract = bundle.contract.model_copy(update={"label_codes": {}})
    [segment] = segment_descriptions(bundle)
    [code] = segment.SegmentedPropertyTypeCodeSequence
    assert (code.CodingSchemeDesignator, code.CodeValue) == ("SCT", "91723000")
