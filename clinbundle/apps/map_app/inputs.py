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
        for f in nifti:
            check_nifti(f)
        return InputScan("nifti", nifti)
    return InputScan("dicom", dicom)


def check_nifti(path: Path) -> None:
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:
        raise MapInputError(f"{path.name}: not a readable NIfTI file ({e})") from None
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise MapInputError(f"{path.name}: expected a 3-D volume, got shape {shape}")


def describe_series(series) -> str:
    """One line per DICOM series for error messages."""
    return (
        f"series {series.SeriesInstanceUID} ({getattr(series, 'Modality', '?')}, "
        f"'{getattr(series, 'SeriesDescription', '')}', {len(series.get_sop_instances())} "
        "instances)"
    )


def check_selection(studies: list, selected: list, rules: dict) -> None:
    """Exactly one series must match the selection rules, and its slices must form a volume."""
    chosen = [s.series for study in selected for s in study.selected_series]
    available = [se for st in studies for se in st.get_all_series()]
    if not chosen:
        raise MapInputError(
            "no DICOM series matches the app's series selection rules "
            f"({rules}); found: " + "; ".join(describe_series(s) for s in available)
        )
    if len(chosen) > 1:
        raise MapInputError(
            f"{len(chosen)} DICOM series match the selection rules; the app segments one series "
            "per run: give it one series (or narrow the rules in app.yaml): "
            + "; ".join(describe_series(s) for s in chosen)
        )
    series = chosen[0]
    instances = [i.get_native_sop_instance() for i in series.get_sop_instances()]
    keys = {
        (
            int(ds.Rows),
            int(ds.Columns),
            tuple(np.round(np.asarray(ds.ImageOrientationPatient, float), 4)),
        )
        for ds in instances
        if "ImageOrientationPatient" in ds
    }
    if len(instances) < 2 or len(keys) != 1:
        raise MapInputError(
            f"{describe_series(series)} is not one volume: it needs at least 2 slices with the "
            f"same rows, columns and ImageOrientationPatient (found {sorted(keys)})"
        )
    if any("ImagePositionPatient" not in ds for ds in instances):
        raise MapInputError(f"{describe_series(series)}: slices without ImagePositionPatient")
