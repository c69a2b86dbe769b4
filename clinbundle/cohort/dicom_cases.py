"""DICOM studies as cases (minimal: the pacs part of issue 17 replaces this module).

Readable DICOM files are grouped by StudyInstanceUID, one case per study; files that are not
DICOM are logged and left out.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from clinbundle.cohort.cases import Case, CaseVolume, files_sha256
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import InputError

log = logging.getLogger("clinbundle.cohort")


def dicom_cases(files: list[Path], root: Path) -> list[Case]:
    """One case per StudyInstanceUID among `files` (headers only are read)."""
    try:
        from pydicom import dcmread
    except ModuleNotFoundError:
        log.warning("%d non-NIfTI file(s) left out: pydicom is not installed", len(files))
        return []
    studies: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = dcmread(f, stop_before_pixels=True)
            uid = str(ds.StudyInstanceUID)
        except Exception as e:  # not DICOM, truncated, or no study UID
            log.warning("%s: left out, not a usable DICOM file (%s)", f.relative_to(root), e)
            continue
        studies.setdefault(uid, []).append(f)
    return [Case(uid, "dicom", tuple(sorted(fs)), files_sha256(fs)) for uid, fs in studies.items()]


def read_dicom_case(case: Case) -> CaseVolume:
    """The pacs part reads the study's series into a volume and its affine."""
    raise InputError(f"{case.case_id}: reading DICOM studies is not implemented yet")


def write_dicom_seg(
    case: Case, volume: CaseVolume, labels: np.ndarray, contract: InferenceContract, path: Path
) -> None:
    raise InputError(f"{case.case_id}: writing DICOM SEG is not implemented yet")
