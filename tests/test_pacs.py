"""DICOM studies as cohort cases, and a real PACS (issue 17, items 1 (DICOM inputs) and 3).

Series are written by `write_ct_series` (oblique, anisotropic, non-square pixels, files named in
reverse slice order) so that a swapped axis, a swapped PixelSpacing, a trusted file order or a
missing rescale each change the volume or the affine the tests compare with the truth. The PACS
is a real Orthanc with its DICOMweb plugin (Debian's `orthanc`, `orthanc-dicomweb`; `make
system-deps` installs them), started on loopback by the `orthanc` fixture.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from pydicom import dcmread

from clinbundle.cli import main
from clinbundle.cohort import dicomweb
from clinbundle.cohort.dicom_cases import dicom_cases, read_dicom_case
from clinbundle.packaging.bento import free_port
from clinbundle.packaging.dicom_synth import (
    SeriesGeometry,
    SeriesInfo,
    oblique,
    quantize_hu,
    write_ct_series,
)
from clinbundle.runtime.errors import InputError

from conftest import earlier_seg, wait_until_it_answers

SLOPE, INTERCEPT = 2.0, -1024.0
GEOMETRY = oblique(20.0, spacing=(0.8, 0.7, 1.5))


def ct_volume(shape=(24, 20, 12), seed: int = 0) -> np.ndarray:
    """HU-like values with structure along every axis (a flipped axis changes them)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.meshgrid(*(np.arange(s) for s in shape), indexing="ij")
    return (-1000 + 40 * i + 7 * j + 90 * k + rng.normal(0, 20, shape)).astype(np.float32)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def write_study(folder: Path, volume: np.ndarray, study_uid: str) -> dict[str, list[Path]]:
    """A study as a PACS export lays it out: a scout, the CT, a thinner-sampled reconstruction,
    nested two folders deep, plus stray files that are not DICOM or not readable."""
    info = {"study_uid": study_uid, "patient_id": "PAT-7"}
    scout = write_ct_series(
        volume[:, :, :1],
        folder / "A" / "scout",
        GEOMETRY,
        SeriesInfo(series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), **info),
    )
    ct = write_ct_series(
        volume,
        folder / "A" / "B" / "ct",
        GEOMETRY,
        SeriesInfo(series_number=2, series_description="CT 1.5 mm", **info),
        rescale=(SLOPE, INTERCEPT),
    )
    recon = write_ct_series(
        volume[:, :, ::2],
        folder / "C",
        oblique(20.0, spacing=(0.8, 0.7, 3.0)),
        SeriesInfo(series_number=3, series_description="CT 3 mm", **info),
    )
    (folder / "README.txt").write_text("not DICOM")
    (folder / "A" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    return {"scout": scout, "ct": ct, "recon": recon}


def test_a_nested_study_is_one_case_of_its_ct_read_like_its_nifti(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Any folder layout: one case per study, the CT chosen by the MAP's rules (each skip
    logged with its reason), stray files left out with a log line; the volume is the HU of the
    series and the affine the NIfTI's of the same synthetic volume (oblique, 0.8 x 0.7 x 1.5)."""
    volume = ct_volume()
    series = write_study(tmp_path / "in", volume, "1.2.826.0.1.3680043.8.498.1")
    with caplog.at_level(logging.INFO, logger="clinbundle.cohort"):
        [case] = dicom_cases(_files(tmp_path / "in"), tmp_path / "in")
    assert case.kind == "dicom" and case.case_id == "1.2.826.0.1.3680043.8.498.1"
    assert sorted(case.files) == sorted(series["ct"])
    log = caplog.text
    assert "segmenting series 2 " in log and "marks a localizer" in log
    assert "skipped series 3 " in log and "another candidate" in log
    assert "README.txt: left out, not a DICOM file" in log
    assert "broken.dcm: left out" in log

    truth = tmp_path / "truth.nii.gz"
    nib.save(nib.Nifti1Image(quantize_hu(volume, SLOPE, INTERCEPT), GEOMETRY.affine_ras()), truth)
    nifti = nib.load(truth)
    got = read_dicom_case(case)
    assert got.image.dtype == np.float32 and got.image.shape == volume.shape
    np.testing.assert_array_equal(got.image, np.asarray(nifti.dataobj, np.float32))
    np.testing.assert_allclose(got.affine, nifti.affine, atol=1e-4)
    assert got.image.min() < -900  # negative HU survive (no uint16 wrap)
    positions = [float(ds.ImagePositionPatient[2]) for ds in got.source]
    assert [ds.SeriesInstanceUID for ds in got.source] == [
        dcmread(series["ct"][0]).SeriesInstanceUID
    ] * 12
    assert positions == sorted(positions)  # slice order, not file order

    # the same study again, in another folder with other file names: the same case
    moved = tmp_path / "moved"
    for n, f in enumerate(series["ct"]):
        (moved / str(n % 3)).mkdir(parents=True, exist_ok=True)
        (moved / str(n % 3) / f"x{n}").write_bytes(f.read_bytes())
    [again] = dicom_cases(_files(moved), moved)
    assert again.content_hash == case.content_hash


def test_the_models_modality_picks_the_series_and_refuses_a_study_without_it(
    tmp_path: Path,
) -> None:
    """A CT model (the contract's modality) reads a study's CT series even where an MR series
    of it has more slices, and refuses an MR-only study with the reason; no modality, any."""
    volume = ct_volume()
    mixed_uid, mr_uid = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.8"
    t1 = SeriesInfo(study_uid=mixed_uid, modality="MR", series_description="T1")
    write_ct_series(np.concatenate([volume, volume], axis=2), tmp_path / "mixed" / "mr", info=t1)
    ct = write_ct_series(volume, tmp_path / "mixed" / "ct", info=SeriesInfo(study_uid=mixed_uid))
    write_ct_series(volume, tmp_path / "mr-only", info=SeriesInfo(mr_uid, modality="MR"))
    cases = {c.case_id: c for c in dicom_cases(_files(tmp_path), tmp_path, "CT")}
    assert sorted(cases[mixed_uid].files) == sorted(ct)
    mixed = read_dicom_case(cases[mixed_uid], "CT")
    assert {ds.Modality for ds in mixed.source} == {"CT"} and mixed.image.shape == volume.shape
    with pytest.raises(InputError, match="CT volume.*Modality MR does not match"):
        read_dicom_case(cases[mr_uid], "CT")
    [anything] = dicom_cases(_files(tmp_path / "mr-only"), tmp_path / "mr-only")
    assert read_dicom_case(anything).image.shape == volume.shape


def test_same_volume_and_affine_as_the_map_operator(tmp_path: Path) -> None:
    """The MAP's HUSeriesToVolumeOperator, on the SDK's own loaded series, gives what the cohort
    reads: the same float32 values and the same RAS affine."""
    from monai.deploy.core import Fragment
    from monai.deploy.operators.dicom_data_loader_operator import DICOMDataLoaderOperator
    from monai.deploy.operators.dicom_series_selector_operator import (
        DICOMSeriesSelectorOperator,
    )

    from clinbundle.apps.map_app.operators import HUSeriesToVolumeOperator
    from clinbundle.apps.map_app.selection import series_rules

    volume = ct_volume(seed=1)
    volume[:, :, 0] = np.abs(volume[:, :, 0]) + 10  # first slice positive: the SDK's dtype trap
    write_ct_series(volume, tmp_path / "in", GEOMETRY, rescale=(SLOPE, INTERCEPT))
    fragment = Fragment()
    studies = DICOMDataLoaderOperator(
        fragment, input_folder=tmp_path / "in", name="loader"
    ).load_data_to_studies(tmp_path / "in")
    selected = DICOMSeriesSelectorOperator(fragment, name="selector").filter(
        series_rules("CT"), studies
    )
    image = HUSeriesToVolumeOperator(fragment, name="to_volume").convert_to_image(selected)
    map_volume = np.transpose(image.asnumpy(), (2, 1, 0))
    map_affine = np.asarray(image.metadata()["affine"], float)

    [case] = dicom_cases(_files(tmp_path / "in"), tmp_path / "in")
    got = read_dicom_case(case)
    np.testing.assert_array_equal(got.image, map_volume)
    np.testing.assert_allclose(got.affine, map_affine, atol=1e-6)


def test_a_study_that_is_no_volume_fails_with_its_reason(tmp_path: Path) -> None:
    """A series with a missing slice, a study of a scout only, and a slice whose pixel data is
    cut off: each is a case whose reading fails with the reason (never a crash, never a guess)."""
    volume = ct_volume()
    gap = write_ct_series(
        volume, tmp_path / "gap", SeriesGeometry(), SeriesInfo(), slices=[0, 1, 2, 4, 5, 6]
    )
    write_ct_series(
        volume[:, :, :1],
        tmp_path / "scout",
        info=SeriesInfo(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")),
    )
    cut = write_ct_series(volume, tmp_path / "cut")
    cut[3].write_bytes(cut[3].read_bytes()[:-300])
    cases = {c.files[0].parent.name: c for c in dicom_cases(_files(tmp_path), tmp_path)}
    assert set(cases) == {"gap", "scout", "cut"} and len(cases["gap"].files) == len(gap)
    with pytest.raises(InputError, match="missing slice"):
        read_dicom_case(cases["gap"])
    with pytest.raises(InputError, match="marks a localizer"):
        read_dicom_case(cases["scout"])
    with pytest.raises(InputError, match=f"{cut[3].name}: pixel data cannot be decoded"):
        read_dicom_case(cases["cut"])


class Orthanc:
    """A real Orthanc with its DICOMweb plugin on loopback (free ports, storage in a temp
    folder, no authentication), which a test may stop like a PACS that went down."""

    PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    # `users`: HTTP basic authentication on; anything else (a bearer token) gets 401

    def __init__(self, root: Path, users: dict[str, str] | None = None) -> None:
        exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin")
        assert exe and self.PLUGIN.is_file(), (
            "Debian's orthanc and orthanc-dicomweb are missing: run `make system-deps`"
        )
        root.mkdir(parents=True, exist_ok=True)
        self.root, self.exe, self.port = root, exe, free_port()
        self.url = f"http://127.0.0.1:{self.port}/dicom-web"
        self.proc: subprocess.Popen | None = None
        config = {
            "Name": "clinbundle-test",
            "StorageDirectory": str(root / "storage"),
            "IndexDirectory": str(root / "index"),
            "HttpPort": self.port,
            "DicomPort": free_port(),
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": bool(users),
            "RegisteredUsers": users or {},
            "Plugins": [str(self.PLUGIN)],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        }
        (root / "orthanc.json").write_text(json.dumps(config))

    def start(self) -> None:
        log = open(self.root / "orthanc.log", "a")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [self.exe, str(self.root / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        system = f"http://127.0.0.1:{self.port}/system"  # 401 with authentication on: it answers
        wait_until_it_answers(system, self.proc, self.root / "orthanc.log", 60, any_status=True)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture
def orthanc(tmp_path: Path):
    server = Orthanc(tmp_path / "orthanc")
    server.start()
    try:
        yield server
    finally:
        server.stop()


def upload(url: str, files: list[Path]) -> None:
    """STOW-RS, as a modality or another archive sends studies to the PACS."""
    from dicomweb_client.api import DICOMwebClient

    DICOMwebClient(url).store_instances([dcmread(f) for f in files])


@pytest.mark.slow
def test_dicomweb_fetch_and_store_against_a_real_orthanc(orthanc: Orthanc, tmp_path: Path) -> None:
    """QIDO finds the uploaded study, WADO retrieves it whole into a folder the DICOM cases
    read, STOW stores a SEG once (a second store finds it there), and a stopped PACS is a
    clear error for queries and a per-case failure, after the retries, for stores."""
    volume = ct_volume()
    study = "1.2.826.0.1.3680043.8.498.7"
    series = write_study(tmp_path / "in", volume, study)
    upload(orthanc.url, [f for fs in series.values() for f in fs])

    client = dicomweb.make_client(orthanc.url)
    assert dicomweb.find_studies(client, orthanc.url, None) == [(study, 12 + 1 + 6)]
    with pytest.raises(dicomweb.DicomwebError, match="has no study 1.2.3"):
        dicomweb.find_studies(client, orthanc.url, ["1.2.3"])
    studies = dicomweb.find_studies(client, orthanc.url, [study])
    assert dicomweb.fetch(client, studies, tmp_path / "got") == []
    [case] = dicom_cases(_files(tmp_path / "got"), tmp_path / "got")
    np.testing.assert_array_equal(
        read_dicom_case(case).image, quantize_hu(volume, SLOPE, INTERCEPT)
    )

    seg = tmp_path / "seg.dcm"
    earlier_seg(series["ct"], seg)
    assert dicomweb.store_seg(client, seg) == "yes"
    assert dicomweb.store_seg(client, seg) == "yes"  # already there: not sent again
    assert len(seg_instances(client, study)) == 1

    orthanc.stop()
    with pytest.raises(dicomweb.DicomwebError, match="cannot be queried .*connection refused"):
        dicomweb.find_studies(client, orthanc.url, None)
    got = dicomweb.store_seg(client, seg, backoff_s=0.01)
    assert got == "failed: connection refused or lost (3 tries)"


def seg_instances(client, study: str) -> list[dict]:
    """QIDO-RS: the SEG instances of a study."""
    return client.search_for_instances(study_instance_uid=study, search_filters={"Modality": "SEG"})


def vessel_volume(seed: int) -> np.ndarray:
    """A synthetic vessel scan like the session model's training data, so it finds something."""
    from clinbundle.training.synth import synthesize_volume

    return synthesize_volume((40, 36, 16), np.random.default_rng(seed))[0]


def predict(*args) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["predict", "--device", "cpu", *map(str, args)])
    return rc, out.getvalue()


def assert_seg_is_the_nifti_labels(seg_path: Path, nifti: Path, ct_files: list[Path]) -> None:
    """The SEG's frame for slice k (by its source instance) is the NIfTI output's labels[:, :, k]
    (rows x columns), and it references the CT series."""
    import highdicom as hd

    seg = hd.seg.segread(seg_path)
    sources = [dcmread(f, stop_before_pixels=True) for f in ct_files]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in sources],
        segment_numbers=[1],
    )[..., 0]
    labels = np.asarray(nib.load(nifti).dataobj)
    np.testing.assert_array_equal(pixels, (labels == 1).transpose(2, 1, 0))


def test_predict_on_a_dicom_folder_writes_a_valid_seg_of_the_chosen_series(
    packaged, tmp_path: Path
) -> None:
    """`predict --input`: a study with a scout, a CT and a reconstruction (nested folders) plus
    stray files is one case; its NIfTI and DICOM SEG outputs hold the same labels, the SEG
    references the CT and dicom3tools' dciodvfy finds no error in it."""
    from test_dicom import dciodvfy_errors

    study = "1.2.826.0.1.3680043.8.498.21"
    volume = vessel_volume(3)
    series = write_study(tmp_path / "in", volume, study)
    rc, stdout = predict(
        "--bundle", packaged.bundle, "--input", tmp_path / "in", "--output", tmp_path / "out",
        "--workdir", packaged.trained.workdir,
    )  # fmt: skip
    assert rc == 0, stdout
    [row] = pd.read_parquet(tmp_path / "out" / "predictions.parquet").to_dict("records")
    assert (row["case_id"], row["status"], row["error"]) == (study, "done", "")
    assert row["shape"] == "x".join(map(str, volume.shape))
    seg = tmp_path / "out" / row["seg"]
    assert dciodvfy_errors(seg) == []
    assert_seg_is_the_nifti_labels(seg, tmp_path / "out" / row["output"], series["ct"])


@pytest.mark.slow
def test_predict_dicomweb_stores_one_seg_per_study_once(
    packaged, orthanc: Orthanc, tmp_path: Path
) -> None:
    """Two CT studies sent to a real Orthanc by STOW; `predict --dicomweb` stores one SEG into
    each (QIDO finds it in the study; it references the CT series and holds the labels of the
    NIfTI output); a second run stores nothing new; a stopped PACS is exit 2 with the reason."""
    studies = {}
    for n, uid in enumerate(["1.2.826.0.1.3680043.8.498.31", "1.2.826.0.1.3680043.8.498.32"]):
        series = write_study(tmp_path / f"study{n}", vessel_volume(10 + n), uid)
        upload(orthanc.url, [f for fs in series.values() for f in fs])
        studies[uid] = series["ct"]
    args = ["--bundle", packaged.bundle, "--dicomweb", orthanc.url, "--output", tmp_path / "out"]
    args += ["--workdir", packaged.trained.workdir]
    rc, stdout = predict(*args)
    assert rc == 0, stdout
    assert "2 case(s): 2 done, 0 failed" in stdout
    table = pd.read_parquet(tmp_path / "out" / "predictions.parquet").set_index("case_id")
    assert sorted(table.index) == sorted(studies)
    assert (table["stored"] == "yes").all(), table["stored"]

    client = dicomweb.make_client(orthanc.url)
    for uid, ct_files in studies.items():
        [found] = seg_instances(client, uid)
        series_uid = found["0020000E"]["Value"][0]
        sop_uid = found["00080018"]["Value"][0]
        stored = tmp_path / "stored.dcm"
        client.retrieve_instance(uid, series_uid, sop_uid).save_as(stored)
        row = table.loc[uid]
        assert dcmread(tmp_path / "out" / row["seg"]).SOPInstanceUID == sop_uid
        assert_seg_is_the_nifti_labels(stored, tmp_path / "out" / row["output"], ct_files)
    assert not list((tmp_path / "out").glob(".dicomweb-*"))  # the retrieved studies are gone

    rc, stdout = predict(*args)
    assert rc == 0 and "nothing new to run" in stdout, stdout
    assert all(len(seg_instances(client, uid)) == 1 for uid in studies)

    orthanc.stop()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc, stdout = predict(*args)
    assert rc == 2, stdout
    assert f"the PACS at {orthanc.url} cannot be queried" in err.getvalue() + stdout
    assert len(pd.read_parquet(tmp_path / "out" / "predictions.parquet")) == 2  # untouched


@pytest.mark.slow
def test_a_pacs_that_refuses_the_token_is_exit_2_and_the_token_never_shows(
    packaged, tmp_path: Path, capsys, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    """The token (from CLINBUNDLE_DICOMWEB_TOKEN) goes as a bearer header; an Orthanc that
    wants other credentials answers 401: exit 2 naming the status, the token in no output."""
    server = Orthanc(tmp_path / "orthanc", users={"alice": "wonderland"})
    server.start()
    token = "s3cret-token-7f2c"
    monkeypatch.setenv(dicomweb.TOKEN_ENV, token)
    try:
        with caplog.at_level(logging.DEBUG):
            rc = main(
                ["predict", "--bundle", str(packaged.bundle), "--dicomweb", server.url,
                 "--output", str(tmp_path / "out"), "--workdir", str(packaged.trained.workdir)]
            )  # fmt: skip
    finally:
        server.stop()
    out = capsys.readouterr()
    assert rc == 2
    assert "cannot be queried (QIDO-RS): HTTP 401" in out.err
    assert token not in out.out + out.err + caplog.text
    assert not (tmp_path / "out").exists()
    assert dicomweb.make_client(server.url)._session.headers["Authorization"] == f"Bearer {token}"
