"""DICOM studies as cohort cases: found in any folder layout, one series chosen per study, read
into the float32 HU volume and RAS affine the MAP reads, and segmented into a DICOM SEG.

Files are grouped by StudyInstanceUID and SeriesInstanceUID from their headers, never by folder
(a PACS export, a CD and a WADO-RS download all lay them out differently). The series to segment
is chosen with the MAP's own rules (`apps/map_app/selection.py`: image series with a patient
geometry, no localizers, most slices, then lowest SeriesNumber), applied here to pydicom
datasets that stand in for the SDK's series objects, so this path needs no MONAI Deploy SDK or
holoscan. A study without such a series, or whose series is not one regular volume, is a case
that fails with the selection's reason; a file that is not DICOM, or whose header cannot be
read, belongs to no study and is left out with a log line.

Why pydicom and not MONAI's PydicomReader: the volume must equal the MAP's
(`HUSeriesToVolumeOperator`, which fixes two SDK bugs: a dtype taken from the first slice and
swapped in-plane spacings) value for value, and the SEG needs the datasets in slice order;
pydicom's modality and presentation LUTs plus the SDK's affine (with DICOM's PixelSpacing
order) are that path in a few lines.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from clinbundle.cohort.cases import Case, CaseVolume
from clinbundle.runtime.errors import InputError

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger("clinbundle.cohort")

#: Headers are read with element values above this size deferred (pixel data stays on disk).
DEFER_SIZE = "4 KB"
#: DICOM patient coordinates (LPS) -> nibabel's RAS.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class _Instance:
    """One file as the SDK's SOP instance (what `selection.py` duck-types)."""

    path: Path
    ds: Dataset

    def get_native_sop_instance(self) -> Dataset:
        return self.ds


@dataclass
class _Series:
    """One series as the SDK's DICOMSeries (the attributes and methods `selection.py` uses)."""

    SeriesInstanceUID: str
    Modality: str
    SeriesNumber: object
    SeriesDescription: str
    instances: list[_Instance] = field(default_factory=list)

    def get_sop_instances(self) -> list[_Instance]:
        return self.instances


@dataclass
class _Study:
    StudyInstanceUID: str
    series: dict[str, _Series] = field(default_factory=dict)

    def get_all_series(self) -> list[_Series]:
        return list(self.series.values())


@dataclass
class _Selected:
    series: _Series


@dataclass
class _StudySelected:
    selected_series: list[_Selected]


def _add(study: _Study, path: Path, ds: Dataset) -> None:
    uid = str(ds.SeriesInstanceUID)
    series = study.series.get(uid)
    if series is None:
        series = study.series[uid] = _Series(
            uid,
            str(ds.get("Modality", "") or ""),
            ds.get("SeriesNumber"),
            str(ds.get("SeriesDescription", "") or ""),
        )
    series.instances.append(_Instance(path, ds))


def _matches(series: _Series, rules: dict) -> bool:
    """The SDK selector's test for string conditions: equal (case-folded) or a regex search."""
    for selection in rules["selections"]:
        ok = True
        for key, wanted in selection.get("conditions", {}).items():
            value = str(getattr(series, key, "") or series.instances[0].ds.get(key, "") or "")
            if not value or not (
                value.casefold() == str(wanted).casefold()
                or re.search(str(wanted), value, re.IGNORECASE)
            ):
                ok = False
        if ok:
            return True
    return False


def choose(study: _Study, modality: str | None = None) -> _Series:
    """The series of `study` to segment, by the MAP's rules; each decision is logged."""
    from clinbundle.apps.map_app.inputs import MapInputError
    from clinbundle.apps.map_app.selection import choose_series, series_rules

    rules = series_rules(modality)
    matched = [_Selected(s) for s in study.get_all_series() if _matches(s, rules)]
    try:
        choice = choose_series([study], [_StudySelected(matched)], rules)
    except MapInputError as e:
        raise InputError(f"study {study.StudyInstanceUID}: {e}") from None
    for line in choice.log_lines():
        log.info("study %s: %s", study.StudyInstanceUID, line)
    return choice.series


def _read_header(path: Path, root: Path) -> Dataset | None:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    where = path.relative_to(root) if path.is_relative_to(root) else path
    try:
        ds = dcmread(path, defer_size=DEFER_SIZE)
    except InvalidDicomError:
        log.warning("%s: left out, not a DICOM file", where)
        return None
    except Exception as e:  # truncated header, bad lengths: pydicom raises several types
        log.warning("%s: left out, unreadable DICOM header (%s: %s)", where, type(e).__name__, e)
        return None
    missing = [
        k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID") if k not in ds
    ]
    if missing:
        log.warning("%s: left out, a DICOM file without %s", where, "/".join(missing))
        return None
    return ds


def series_hash(instances: list[_Instance]) -> str:
    """sha256 over (SOPInstanceUID, file bytes) in SOPInstanceUID order: independent of file
    names and folders, so a study downloaded again into a new folder is the same case."""
    h = hashlib.sha256()
    for inst in sorted(instances, key=lambda i: str(i.ds.SOPInstanceUID)):
        h.update(str(inst.ds.SOPInstanceUID).encode() + b"\0")
        with inst.path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _studies(files: list[Path], root: Path) -> dict[str, _Study]:
    studies: dict[str, _Study] = {}
    seen: set[str] = set()
    for path in sorted(files):
        ds = _read_header(path, root)
        if ds is None:
            continue
        if str(ds.SOPInstanceUID) in seen:
            log.warning("%s: left out, a second copy of SOP instance %s", path, ds.SOPInstanceUID)
            continue
        seen.add(str(ds.SOPInstanceUID))
        uid = str(ds.StudyInstanceUID)
        _add(studies.setdefault(uid, _Study(uid)), path, ds)
    return studies


def dicom_cases(files: list[Path], root: Path, modality: str | None = None) -> list[Case]:
    """One case per StudyInstanceUID among `files`: the files of its chosen series (hashed by
    `series_hash`), or, when no series qualifies, all of its files (reading it then fails with
    the reason). `modality` narrows the candidates to the model's (None: any image series)."""
    if importlib.util.find_spec("pydicom") is None:
        log.warning(
            "%d non-NIfTI file(s) left out: reading DICOM needs pydicom "
            "(pip install 'clinbundle[pacs]')",
            len(files),
        )
        return []
    cases = []
    for uid, study in sorted(_studies(files, Path(root)).items()):
        try:
            instances = choose(study, modality).instances
        except InputError as e:
            log.warning("%s", e)
            instances = [i for s in study.get_all_series() for i in s.instances]
        paths = tuple(i.path for i in sorted(instances, key=lambda i: str(i.ds.SOPInstanceUID)))
        cases.append(Case(uid, "dicom", paths, series_hash(instances)))
    return cases


def _pixels(ds: Dataset, path: Path) -> np.ndarray:
    """Stored values -> modality LUT (rescale to HU) -> presentation LUT, as float32 (the MAP's
    `HUSeriesToVolumeOperator.generate_voxel_data`)."""
    from pydicom.pixels import apply_modality_lut, apply_presentation_lut

    try:
        values = apply_presentation_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    except Exception as e:  # truncated pixel data, no decoder for the transfer syntax
        raise InputError(
            f"{path.name}: pixel data cannot be decoded ({type(e).__name__}: {e})"
        ) from None
    if values.ndim != 2:
        raise InputError(f"{path.name}: {values.ndim}-D pixel data; expected one slice per file")
    return values.astype(np.float32)


def series_affine(sources: list[Dataset]) -> np.ndarray:
    """The RAS affine of volume[i (column), j (row), k (slice)] of `sources` (slice order): the
    SDK's construction (first and last ImagePositionPatient) with DICOM's PixelSpacing order,
    (between rows, between columns), which the MAP's operator restores."""
    iop = np.asarray(sources[0].ImageOrientationPatient, float)
    between_rows, between_columns = (float(x) for x in sources[0].PixelSpacing)
    first = np.asarray(sources[0].ImagePositionPatient, float)
    last = np.asarray(sources[-1].ImagePositionPatient, float)
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * between_columns
    lps[:3, 1] = iop[3:] * between_rows
    lps[:3, 2] = (last - first) / (len(sources) - 1)
    lps[:3, 3] = first
    return LPS_TO_RAS @ lps


def read_dicom_case(case: Case, modality: str | None = None) -> CaseVolume:
    """The chosen series of `case` as float32 HU [i, j, k] with its RAS affine; `source` holds
    its datasets in slice order (for the SEG). InputError for a study that cannot be one, or
    that has no series of `modality` (the model's: a CT model does not segment an MR study)."""
    from pydicom import dcmread

    from clinbundle.apps.dicom_seg import sorted_sources
    from clinbundle.apps.map_app.inputs import MapInputError
    from clinbundle.apps.map_app.selection import check_volume_geometry

    study = _Study(case.case_id)
    for path in case.files:
        try:
            ds = dcmread(path)
        except Exception as e:
            raise InputError(
                f"{path.name}: unreadable DICOM file ({type(e).__name__}: {e})"
            ) from None
        _add(study, path, ds)
    series = choose(study, modality)
    try:
        check_volume_geometry(series)
    except MapInputError as e:
        raise InputError(f"study {case.case_id}: {e}") from None
    paths = {id(i.ds): i.path for i in series.instances}
    sources = sorted_sources([i.ds for i in series.instances])
    volume = np.stack([_pixels(ds, paths[id(ds)]) for ds in sources])  # [k, row, column]
    image = np.ascontiguousarray(volume.transpose(2, 1, 0))
    return CaseVolume(image, series_affine(sources), sources)


def write_dicom_seg(case: Case, volume: CaseVolume, labels: np.ndarray, model, path: Path) -> Path:
    """The DICOM SEG of `labels` ([i, j, k] on the case's grid) over the case's source series,
    written atomically to `path`; built by the MAP's own SEG code (`apps/dicom_seg.py`).

    `model` is the CohortModel (its name and version code the segments' algorithm and the
    equipment)."""
    from clinbundle.apps import dicom_seg

    if not volume.source:
        raise InputError(f"{case.case_id}: no DICOM source series to reference in a SEG")
    name, version = str(model.name), str(model.version or "0")
    seg = dicom_seg.build_seg(
        np.ascontiguousarray(np.asarray(labels, np.uint8).transpose(2, 1, 0)),  # [k, row, column]
        list(volume.source),
        dicom_seg.segment_descriptions(model.contract, name, version),
        model_name=name,
        model_version=version,
        device_serial_number=version,
    )
    return dicom_seg.save_atomic(seg, Path(path))
