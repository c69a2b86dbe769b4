"""Input checks that run before the graph, so a bad input fails with a message and no output.

The SDK's operators log and skip what they cannot read (a stray file, a series no rule selects)
and fail later with a generic error inside the graph; a clinical app must instead say which
file is wrong and write nothing. The checks reuse the SDK's own loader and selector instances
(see `SegmentationApp.compose`), so they decide exactly what the graph would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from clinbundle.runtime.errors import InputError
from clinbundle.runtime.nifti_check import is_nifti, nifti_stem, read_checked

__all__ = ["InputScan", "MapInputError", "check_nifti", "is_nifti", "nifti_stem", "scan_input"]


class MapInputError(Exception):
    """The input folder cannot be processed; the message says which file and why."""


@dataclass
class InputScan:
    kind: Literal["dicom", "nifti"]
    files: list[Path]


def _files(folder: Path) -> list[Path]:
    return sorted(Path(root) / f for root, _dirs, files in os.walk(folder) for f in files)


def scan_input(folder: Path) -> InputScan:
    """Classify every file in `folder` as NIfTI or DICOM; anything else is an error.

    DICOM files are read completely, pixel data included, so a truncated file is caught here
    and not halfway through the graph.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise MapInputError(f"input folder {folder} does not exist or is not a folder")
    files = _files(folder)
    if not files:
        raise MapInputError(
            f"input folder {folder} is empty: put one DICOM series or NIfTI files (.nii/.nii.gz) in it"
        )
    nifti = [f for f in files if is_nifti(f)]
    dicom, problems = [], []
    for f in files:
        if is_nifti(f):
            continue
        try:
            ds = dcmread(f)
        except InvalidDicomError:
            problems.append(f"{f.relative_to(folder)}: neither DICOM nor NIfTI (.nii/.nii.gz)")
            continue
        except Exception as e:  # EOF, bad lengths: pydicom raises several types
            problems.append(
                f"{f.relative_to(folder)}: unreadable DICOM file, truncated or corrupt ({e})"
            )
            continue
        if "PixelData" in ds:
            try:
                ds.pixel_array  # noqa: B018 - decoding is the check
            except Exception as e:
                problems.append(
                    f"{f.relative_to(folder)}: DICOM pixel data cannot be decoded, the file "
                    f"may be truncated ({e})"
                )
                continue
        dicom.append(f)
    if problems:
        raise MapInputError(
            f"{len(problems)} file(s) in {folder} cannot be used:\n  - " + "\n  - ".join(problems)
        )
    if nifti and dicom:
        raise MapInputError(
            f"{folder} holds both NIfTI ({len(nifti)}) and DICOM ({len(dicom)}) files; "
            "give one kind per run"
        )
    if nifti:
        problems = []
        for f in nifti:
            try:
                check_nifti(f, folder)
            except MapInputError as e:
                problems.append(str(e))
        if problems:
            raise MapInputError(
                f"{len(problems)} NIfTI file(s) in {folder} cannot be used:\n  - "
                + "\n  - ".join(problems)
            )
        return InputScan("nifti", nifti)
    return InputScan("dicom", dicom)


def check_nifti(path: Path, folder: Path | None = None) -> None:
    """A NIfTI file must be one 3-D volume with finite intensities and a usable geometry.

    Reads the whole image (NaN voxels are only found that way): an input the model would turn
    into garbage, or an affine the label file could not be placed with, fails here. The checks
    are the runtime core's (`nifti_check`), shared with batch inference.
    """
    name = str(path.relative_to(folder)) if folder is not None else path.name
    try:
        read_checked(path, name)
    except InputError as e:
        raise MapInputError(str(e)) from None
