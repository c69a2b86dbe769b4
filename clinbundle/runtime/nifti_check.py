"""A NIfTI file from outside, checked before it is trusted: the header first (shape, spacing,
affine, data type, size), then the voxels (finite). Shared by the MAP app and batch inference
(`clinbundle predict`), so both refuse the same files with the same words.

nibabel reads any header it can parse and maps the data lazily; it does not refuse a 4-D file, a
zero spacing, a singular affine or a header that declares more voxels than memory holds, which a
clinical app must (a gzip file of a few kB can declare terabytes).
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from clinbundle.runtime.errors import InputError

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """`case.nii.gz` -> `case` (Path.stem would keep `.nii`)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _stored_zooms(path: Path, img) -> np.ndarray:
    """pixdim as stored: nibabel's header check on load silently turns a zero into 1."""
    from nibabel.openers import ImageOpener

    try:
        with ImageOpener(str(path)) as f:
            raw = type(img.header).from_fileobj(f, check=False)
        return np.asarray(raw["pixdim"][1:4], float)
    except Exception:
        return np.asarray(img.header.get_zooms()[:3], float)


def check_header(path: Path, name: str, max_voxels: int | None = None):
    """The parsed image (data not read) when its header describes one usable 3-D volume."""
    try:
        img = nib.load(str(path))
        shape = img.shape
    except Exception as e:
        raise InputError(f"{name}: not a readable NIfTI file ({e})") from None
    if len(shape) != 3 and not (len(shape) == 4 and shape[3] == 1):
        raise InputError(f"{name}: expected a 3-D volume, got shape {shape}")
    if min(shape[:3]) < 2:
        raise InputError(f"{name}: shape {shape[:3]} is not a volume (a 2-D image?)")
    if max_voxels is not None and int(np.prod(shape[:3], dtype=np.int64)) > max_voxels:
        raise InputError(
            f"{name}: {'x'.join(map(str, shape[:3]))} voxels exceed the limit of {max_voxels}"
        )
    try:
        dtype = np.dtype(img.get_data_dtype())
    except Exception as e:
        raise InputError(f"{name}: unknown image data type ({e})") from None
    if dtype.kind not in "biuf":
        raise InputError(f"{name}: image data type {dtype} is not a number")
    zooms = _stored_zooms(path, img)
    if not np.isfinite(zooms).all() or (zooms <= 0).any():
        raise InputError(
            f"{name}: voxel spacing {np.round(zooms, 4).tolist()} must be finite and positive"
        )
    affine = np.asarray(img.affine, float)
    if not np.isfinite(affine).all():
        raise InputError(f"{name}: the affine has non-finite values: {affine.round(4).tolist()}")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(f"{name}: the affine is singular (det 0): {affine.round(4).tolist()}")
    return img


def read_checked(
    path: Path, name: str | None = None, max_voxels: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(D, H, W) float32 voxels and the 4x4 affine of a checked NIfTI file; InputError names
    the file and the reason otherwise. The voxels are read only after the header passed."""
    name = name or Path(path).name
    img = check_header(Path(path), name, max_voxels)
    try:
        data = np.asarray(img.dataobj)
    except Exception as e:
        raise InputError(f"{name}: the image data cannot be read ({e})") from None
    if data.dtype.kind not in "biuf":
        raise InputError(f"{name}: image data type {data.dtype} is not a number")
    bad = int(np.count_nonzero(~np.isfinite(data))) if data.dtype.kind == "f" else 0
    if bad:
        raise InputError(f"{name}: {bad} voxel(s) are NaN or infinite")
    data = data.reshape(data.shape[:3]).astype(np.float32, copy=False)
    return data, np.asarray(img.affine, float)
