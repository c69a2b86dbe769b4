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

import nibabel as nib
import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


class MapInputError(Exception):
    """The input folder cannot be processed; the message says which file and why."""


@dataclass
class InputScan:
    kind: Literal["dicom", "nifti"]
    files: list[Path]


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


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


def _stored_zooms(path: Path, img) -> np.ndarray:
    """pixdim as stored: nibabel's header check on load silently turns a zero into 1."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"][1:4], float)
    except Exception:
        return np.asarray(img.header.get_zooms()[:3], float)


def check_nifti(path: Path, folder: Path | None = None) -> None:
    """A NIfTI file must be one 3-D volume with finite intensities and a usable geometry.

    Reads the whole image (NaN voxels are only found that way): an input the model would turn
    into garbage, or an affine the label file could not be placed with, fails here.
    """
    name = str(path.relative_to(folder)) if folder is not None else path.name
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:
        raise MapInputError(f"{name}: not a readable NIfTI file ({e})") from None
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise MapInputError(f"{name}: expected a 3-D volume, got shape {shape}")
    if min(shape[:3]) < 2:
        raise MapInputError(f"{name}: shape {shape[:3]} is not a volume (a 2-D image?)")
    zooms = _stored_zooms(path, img)
    if not np.isfinite(zooms).all() or (zooms <= 0).any():
        raise MapInputError(
            f"{name}: voxel spacing {np.round(zooms, 4).tolist()} must be finite and positive"
        )
    affine = np.asarray(img.affine, float)
    if not np.isfinite(affine).all():
        raise MapInputError(f"{name}: the affine has non-finite values: {affine.round(4).tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise MapInputError(f"{name}: the affine is singular (det 0): {affine.round(4).tolist()}")
    try:
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise MapInputError(f"{name}: the image data cannot be read ({e})") from None
    if data.dtype.kind not in "biuf":
        raise MapInputError(f"{name}: image data type {data.dtype} is not a number")
    bad = int(np.count_nonzero(~np.isfinite(data))) if data.dtype.kind == "f" else 0
    if bad:
        raise MapInputError(f"{name}: {bad} voxel(s) are NaN or infinite")
