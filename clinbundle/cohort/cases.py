"""What a cohort is made of: cases found in a folder (a NIfTI file each, or a DICOM study) and
how one is read into a volume with its geometry.

A case is identified by the sha256 of its bytes, so the manifest recognises it again after a
rename or a move, and a changed file is a new case.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from clinbundle.runtime.errors import InputError
from clinbundle.runtime.nifti_check import is_nifti, nifti_stem, read_checked

log = logging.getLogger("clinbundle.cohort")

#: Refuse a case larger than this before its voxels are read (CLINBUNDLE_MAX_VOXELS overrides):
#: 512^3 is a whole-body CT; its float32 probabilities of a few classes fit a worker's memory.
MAX_VOXELS = int(os.environ.get("CLINBUNDLE_MAX_VOXELS", 0)) or 512**3


@dataclass(frozen=True)
class Case:
    case_id: str
    kind: Literal["nifti", "dicom"]
    files: tuple[Path, ...]
    content_hash: str

    @property
    def input(self) -> str:
        """What the table names as the input: the file, or the study's folder for DICOM."""
        return str(self.files[0]) if self.kind == "nifti" else self.case_id


@dataclass
class CaseVolume:
    image: np.ndarray  # (D, H, W) float32, raw intensities
    affine: np.ndarray  # 4x4 voxel -> RAS mm (nibabel's convention)
    source: object | None = None  # DICOM: the datasets of the chosen series (for the SEG)


def files_sha256(files: tuple[Path, ...] | list[Path]) -> str:
    """sha256 over the files' bytes in sorted path order."""
    h = hashlib.sha256()
    for path in sorted(files):
        with Path(path).open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _walk(folder: Path) -> list[Path]:
    """Regular files only: a device or FIFO under the folder (e.g. a link to /dev/zero) would
    never finish hashing."""
    found = sorted(Path(root) / f for root, _dirs, names in os.walk(folder) for f in names)
    files = [p for p in found if p.is_file()]
    for p in sorted(set(found) - set(files)):
        log.warning("%s: left out, not a regular file", p.relative_to(folder))
    return files


def _nifti_ids(files: list[Path], folder: Path) -> dict[Path, str]:
    """case_id = the file's stem; where two folders hold the same stem, its relative path."""
    stems = [nifti_stem(f) for f in files]
    ids = {}
    for f, stem in zip(files, stems, strict=True):
        if stems.count(stem) > 1:
            rel = f.relative_to(folder)
            stem = "__".join((*rel.parent.parts, nifti_stem(rel)))
        ids[f] = stem
    return ids


def discover(folder: Path, modality: str | None = None) -> list[Case]:
    """Every case under `folder`, sorted by case_id: each NIfTI file is one; the other files go
    to `dicom_cases` (one case per study, its series of `modality`, the model's; files that are
    not DICOM are logged and left out)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"input folder {folder} does not exist or is not a folder")
    files = _walk(folder)
    nifti = [f for f in files if is_nifti(f)]
    ids = _nifti_ids(nifti, folder)
    cases = [Case(ids[f], "nifti", (f,), files_sha256([f])) for f in nifti]
    others = [f for f in files if not is_nifti(f)]
    if others:
        from clinbundle.cohort.dicom_cases import dicom_cases

        cases += dicom_cases(others, folder, modality)
    if not cases:
        raise InputError(
            f"{folder} holds no cases: put NIfTI files (.nii/.nii.gz) or DICOM studies in it"
        )
    seen: set[str] = set()
    for c in cases:
        if c.case_id in seen:
            raise InputError(f"{folder}: two cases are both named '{c.case_id}'")
        seen.add(c.case_id)
    log.info("%s: %d case(s) (%d NIfTI)", folder, len(cases), len(nifti))
    return sorted(cases, key=lambda c: c.case_id)


def read_case(case: Case, max_voxels: int = MAX_VOXELS, modality: str | None = None) -> CaseVolume:
    """The case's volume and geometry; InputError with the reason for a bad case. `modality`
    (the model's) picks a DICOM study's series of that modality and refuses a study without
    one; a NIfTI file does not say its modality."""
    if case.kind == "nifti":
        image, affine = read_checked(case.files[0], case.files[0].name, max_voxels)
        return CaseVolume(image, affine)
    from clinbundle.cohort.dicom_cases import read_dicom_case

    return read_dicom_case(case, modality)
