"""Synthetic 3D vessel-segmentation data in the Medical Segmentation Decathlon (MSD) layout.

Why generate data at all: the quickstart has to run anywhere, offline, without a licence
click-through or a multi-gigabyte download, and the test suite has to make its own small data
sets in a temporary folder instead of depending on files that may not be there. The same seed
always gives the same bytes, so runs, caches and parity checks are reproducible.

What the generator models, per volume:

* two or three vessel trees, each a root tube entering through a face of the volume and
  branching recursively (2-3 levels, two or sometimes three children per bifurcation), with
  directions that wander smoothly, radii that taper and ripple along each branch and shrink
  at every bifurcation (roughly after Murray's law), from about 4 down to 1.5 voxels at 64^3
  (scaled with ``min(shape) / 64`` but never below 1.2 voxels);
* partial-volume edges (a one-voxel intensity ramp across the tube wall) and a slight
  point-spread blur, so the outermost vessel voxels are only half as bright as the core;
* a smooth low-frequency background texture (gaussian-filtered noise), a smooth
  multiplicative bias field (linear plus quadratic drift across the volume) and additive
  white gaussian noise.

Intensities are raw CT-like values (background about 100, vessels about 250-300, noise sd
about 30-40), not normalised: the training pipeline normalises itself. The contrast-to-noise
ratio is about 3-5, so vessel and background intensity ranges overlap and a global threshold
is a mediocre segmenter; the label is every voxel whose centre lies inside a tube.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import operator
import os
import re
import secrets
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

__all__ = ["GENERATOR_VERSION", "synthesize_volume", "write_dataset"]

#: Bumped whenever the same seed would produce different volumes; recorded in dataset.json.
GENERATOR_VERSION = 1

_MIN_DIM = 16
_MIN_VESSEL_FRACTION = 0.005
_MAX_TREES = 64
_SEGMENTS_PER_CHUNK = 8
_SPLITS = {"train": 0, "test": 1}
_SUBDIRS = ("imagesTr", "labelsTr", "imagesTs", "labelsTs")
_CASE_FILE = re.compile(r"^vessel_t?\d{3,}\.nii\.gz$")
_TMP_FILE = re.compile(r"^\.(vessel_t?\d{3,}\.nii\.gz|dataset\.json)\.\d+\.[0-9a-f]{8}\.tmp$")


# --------------------------------------------------------------------------- validation


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    """Fail early with a readable message instead of deep inside numpy."""
    try:
        dims = tuple(operator.index(s) for s in shape)
    except TypeError as exc:
        raise ValueError(f"shape must be three integers, got {shape!r}") from exc
    if len(dims) != 3:
        raise ValueError(f"shape must have exactly three dimensions (D, H, W), got {shape!r}")
    if min(dims) < _MIN_DIM:
        raise ValueError(f"every shape dimension must be >= {_MIN_DIM}, got shape={dims}")
    return dims  # type: ignore[return-value]


def _check_spacing(spacing: Sequence[float]) -> tuple[float, float, float]:
    """Spacing ends up in the affine; zero or negative values would make it singular."""
    try:
        values = tuple(float(s) for s in spacing)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spacing must be three positive numbers, got {spacing!r}") from exc
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(f"spacing must be three positive finite numbers, got {spacing!r}")
    return values  # type: ignore[return-value]


def _check_count(name: str, value: int, minimum: int) -> int:
    try:
        count = operator.index(value)
    except TypeError as exc:
        raise ValueError(f"{name} must be an integer, got {value!r}") from exc
    if count < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {name}={count}")
    return count


# --------------------------------------------------------------------------- geometry


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _perpendicular_basis(d: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Random orthonormal pair (u, v) perpendicular to d, to place child branches around d."""
    u = np.cross(d, rng.normal(size=3))
    if np.linalg.norm(u) < 1e-6:  # practically impossible, but keep it total
        u = np.cross(d, np.array([1.0, 0.0, 0.0]) if abs(d[0]) < 0.9 else np.eye(3)[1])
    u = _unit(u)
    return u, np.cross(d, u)


def _grow_branch(
    rng: np.random.Generator,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    length: float,
    step: float,
    min_radius: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Polyline of one branch: the direction wanders with a smooth (AR(1)) angular velocity."""
    n_steps = max(2, round(length / step))
    points = np.empty((n_steps + 1, 3))
    points[0] = start
    d = _unit(direction)
    w = np.zeros(3)
    for k in range(1, n_steps + 1):
        w = 0.8 * w + rng.normal(0.0, 0.05, size=3)
        w -= np.dot(w, d) * d  # turn, don't speed up
        d = _unit(d + w)
        points[k] = points[k - 1] + step * d
    t = np.linspace(0.0, 1.0, n_steps + 1)
    taper = rng.uniform(0.05, 0.2)
    ripple = 0.08 * np.sin(2 * np.pi * rng.uniform(0.5, 2.0) * t + rng.uniform(0, 2 * np.pi))
    radii = np.maximum(radius * (1.0 - taper * t) * (1.0 + ripple), min_radius)
    return points, radii


def _grow_tree(
    rng: np.random.Generator,
    shape: tuple[int, int, int],
    scale: float,
    min_radius: float,
) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Branches of one tree as (points, radii, relative brightness) triples."""
    dims = np.asarray(shape, dtype=float)
    axis = int(rng.integers(3))
    start = rng.uniform(0.25, 0.75, size=3) * (dims - 1)
    start[axis] = 0.0 if rng.random() < 0.5 else dims[axis] - 1
    target = rng.uniform(0.35, 0.65, size=3) * (dims - 1)
    step = max(1.0, 1.5 * scale)
    depth = int(rng.integers(2, 4))  # 2-3 levels of bifurcation below the root

    branches: list[tuple[np.ndarray, np.ndarray, float]] = []
    stack = [
        (
            start,
            _unit(target - start),
            max(rng.uniform(3.2, 4.0) * scale, min_radius),
            rng.uniform(0.45, 0.65) * min(shape),
            0,
        )
    ]
    while stack:
        p0, d0, r0, length, level = stack.pop()
        points, radii = _grow_branch(rng, p0, d0, r0, length, step, min_radius)
        branches.append((points, radii, float(rng.uniform(0.9, 1.1))))
        end = points[-1]
        if level >= depth or np.any(end < -4 * step) or np.any(end > dims - 1 + 4 * step):
            continue
        end_dir = _unit(points[-1] - points[-2])
        n_children = 3 if rng.random() < 0.2 else 2
        # Murray's law r_parent^3 = sum r_child^3, jittered.
        child_r = radii[-1] * n_children ** (-1 / 3)
        u, v = _perpendicular_basis(end_dir, rng)
        phase = rng.uniform(0, 2 * np.pi)
        for j in range(n_children):
            theta = np.deg2rad(rng.uniform(25, 55))
            phi = phase + 2 * np.pi * j / n_children
            direction = np.cos(theta) * end_dir + np.sin(theta) * (
                np.cos(phi) * u + np.sin(phi) * v
            )
            stack.append(
                (
                    end,
                    direction,
                    max(child_r * rng.uniform(0.9, 1.1), min_radius),
                    length * rng.uniform(0.55, 0.8),
                    level + 1,
                )
            )
    return branches


def _rasterise_branch(
    occupancy: np.ndarray,
    signal: np.ndarray,
    points: np.ndarray,
    radii: np.ndarray,
    brightness: float,
) -> None:
    """Paint a variable-radius tube into occupancy/signal, touching only local bounding boxes.

    The tube is a chain of cone-capsules; segments are processed in chunks so each chunk's
    bounding box is small and all distances are computed in one vectorised pass. Occupancy is
    a partial-volume ramp ``clip(r - d + 0.5, 0, 1)``, so ``occupancy >= 0.5`` is exactly
    "voxel centre inside the tube".
    """
    shape = np.asarray(occupancy.shape)
    n_seg = len(points) - 1
    for s0 in range(0, n_seg, _SEGMENTS_PER_CHUNK):
        s1 = min(s0 + _SEGMENTS_PER_CHUNK, n_seg)
        chunk = points[s0 : s1 + 1]
        rmax = float(radii[s0 : s1 + 1].max())
        lo = np.maximum(np.floor(chunk.min(axis=0) - rmax - 1).astype(int), 0)
        hi = np.minimum(np.ceil(chunk.max(axis=0) + rmax + 1).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
        grid = np.stack(
            np.meshgrid(*(np.arange(a, b) for a, b in zip(lo, hi, strict=True)), indexing="ij"),
            axis=-1,
        ).reshape(-1, 3)
        a = points[s0:s1]
        ab = points[s0 + 1 : s1 + 1] - a
        ab2 = np.maximum(np.einsum("ij,ij->i", ab, ab), 1e-12)
        xa = grid[:, None, :] - a[None, :, :]  # (N, C, 3)
        t = np.clip(np.einsum("ncj,cj->nc", xa, ab) / ab2, 0.0, 1.0)
        dist = np.linalg.norm(xa - t[..., None] * ab[None], axis=-1)
        r = radii[s0:s1] + t * (radii[s0 + 1 : s1 + 1] - radii[s0:s1])
        occ = np.clip(r - dist + 0.5, 0.0, 1.0).max(axis=1).reshape(hi - lo).astype(np.float32)
        np.maximum(occupancy[box], occ, out=occupancy[box])
        np.maximum(signal[box], occ * np.float32(brightness), out=signal[box])


# --------------------------------------------------------------------------- intensities


def _bias_field(shape: tuple[int, int, int], rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative drift (about +-15%): linear plus quadratic terms per axis."""
    field = np.ones(shape, dtype=np.float32)
    for axis, n in enumerate(shape):
        x = np.linspace(-1.0, 1.0, n, dtype=np.float32)
        term = rng.uniform(-0.08, 0.08) * x + rng.uniform(-0.06, 0.06) * x**2
        view = [1, 1, 1]
        view[axis] = n
        field += term.astype(np.float32).reshape(view)
    return field


def synthesize_volume(
    shape: tuple[int, int, int], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT-like vessel volume, so tests and the quickstart need no downloads.

    Returns ``(image, label)``: image float32 ``(D, H, W)`` in raw CT-like units, label uint8
    ``(D, H, W)`` with 0 background and 1 vessel; at least 0.5% of the voxels are vessel.
    """
    dims = _check_shape(shape)
    scale = min(dims) / 64.0
    min_radius = max(1.2, 1.5 * scale)

    occupancy = np.zeros(dims, dtype=np.float32)
    signal = np.zeros(dims, dtype=np.float32)
    n_trees = int(rng.integers(2, 4))
    trees = 0
    while trees < n_trees or np.count_nonzero(occupancy >= 0.5) < _MIN_VESSEL_FRACTION * (
        occupancy.size
    ):
        if trees >= _MAX_TREES:  # unreachable for sane shapes; never loop forever
            raise RuntimeError(f"could not place enough vessel voxels in a {dims} volume")
        for points, radii, brightness in _grow_tree(rng, dims, scale, min_radius):
            _rasterise_branch(occupancy, signal, points, radii, brightness)
        trees += 1
    label = (occupancy >= 0.5).astype(np.uint8)

    # Background: tissue at ~100 with low-frequency texture of sd ~15-25.
    texture = ndimage.gaussian_filter(
        rng.standard_normal(dims, dtype=np.float32), sigma=max(2.0, 4.0 * scale), mode="reflect"
    )
    texture *= np.float32(rng.uniform(15.0, 25.0) / max(float(texture.std()), 1e-6))
    contrast = np.float32(rng.uniform(170.0, 220.0))
    image = np.float32(rng.uniform(90.0, 110.0)) + texture + contrast * signal
    image = ndimage.gaussian_filter(image, sigma=0.6, mode="nearest")  # scanner point spread
    image *= _bias_field(dims, rng)
    image += rng.standard_normal(dims, dtype=np.float32) * np.float32(rng.uniform(30.0, 36.0))
    return image.astype(np.float32, copy=False), label


# --------------------------------------------------------------------------- writing


def synthetic_ct(shape: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    """A whole-CT-sized int16 HU volume made cheaply (soft tissue in a body ellipse, air
    outside, a few bright tubes, noise): for memory and size tests, not for training."""
    rng = np.random.default_rng(seed)
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2 < 1
    plane = np.where(body, 40, -1000).astype(np.int16)
    volume = np.repeat(plane[:, :, None], shape[2], axis=2)
    for _ in range(6):
        cx, cy = rng.uniform(-0.4, 0.4, 2)
        r = rng.uniform(0.01, 0.03)
        tube = (x - cx) ** 2 + (y - cy) ** 2 < r**2
        volume[tube] = 300
    volume += rng.integers(-20, 20, volume.shape, dtype=np.int16)
    return volume


def _atomic_write(path: Path, data: bytes) -> None:
    """Readers never see half a file: write a sibling temp file, then rename over the target."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


#: (spacing in mm, axis codes) that `mixed_geometry` cycles through, case by case: what a
#: scanner archive looks like (anisotropic CT, images stored LPS as DICOM converters write them).
GEOMETRY_VARIANTS: tuple[tuple[tuple[float, float, float], str], ...] = (
    ((1.0, 1.0, 1.0), "RAS"),
    ((0.8, 0.8, 1.5), "RAS"),
    ((1.0, 1.0, 1.0), "LPS"),
    ((1.25, 1.25, 0.8), "LPS"),
)


def regrid(
    image: np.ndarray, label: np.ndarray, affine: np.ndarray, spacing: tuple, axcodes: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same anatomy stored at another spacing and orientation (image bilinear, label
    nearest), with the affine that says so: what `mixed_geometry` and tests feed the model."""
    from clinbundle.runtime.geometry import plan, reorient, resample

    grid = plan(image.shape, affine, spacing, None)
    image = resample(image[None], grid.input, grid.model, "bilinear")
    label = resample(label[None].astype(np.float32), grid.input, grid.model, "nearest")
    start = nib.io_orientation(grid.model.affine)
    ornt = nib.orientations.ornt_transform(start, nib.orientations.axcodes2ornt(tuple(axcodes)))
    out_affine = grid.model.affine @ nib.orientations.inv_ornt_aff(ornt, grid.model.shape)
    image, label = reorient(image, ornt)[0], reorient(label, ornt)[0]
    return image.astype(np.float32), np.rint(label).astype(np.uint8), out_affine


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    """Deterministic .nii.gz bytes: explicit header codes and a gzip header without mtime/name."""
    img = nib.Nifti1Image(array, affine)
    img.header.set_data_dtype(array.dtype)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0, filename="", compresslevel=6) as gz:
        gz.write(img.to_bytes())
    return buf.getvalue()


def _is_previous_output(out: Path) -> bool:
    """True for a folder this module wrote (or began to write); anything else is not ours."""
    manifest = out / "dataset.json"
    if manifest.is_file():
        try:
            meta = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(meta, dict) and "synth" in meta
    # An interrupted run leaves case files (and maybe temp files) but no dataset.json, which
    # is written last; recognise that exact shape so a rerun can finish the job.
    for entry in out.iterdir():
        if entry.is_file() and _TMP_FILE.match(entry.name):
            continue
        if entry.name not in _SUBDIRS or not entry.is_dir():
            return False
        for f in entry.iterdir():
            if not (f.is_file() and (_CASE_FILE.match(f.name) or _TMP_FILE.match(f.name))):
                return False
    return True


def _case_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Per-case stream, so case i is the same whatever n or n_test is."""
    return np.random.default_rng(np.random.SeedSequence([seed, _SPLITS[split], index]))


def write_dataset(
    out: Path,
    n: int = 16,
    shape: tuple[int, int, int] = (64, 64, 64),
    seed: int = 0,
    n_test: int = 4,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
    mixed_geometry: bool = False,
) -> Path:
    """Write an MSD-style synthetic vessel data set into ``out``; return its dataset.json path.

    Writes ``imagesTr``/``labelsTr`` (``vessel_000.nii.gz`` ...), a held-out
    ``imagesTs``/``labelsTs`` (``vessel_t000.nii.gz`` ...) and ``dataset.json``. The same
    arguments give byte-identical files. A previous synthetic output in ``out`` is
    overwritten; any other non-empty folder is refused so user data is never clobbered.
    With `mixed_geometry`, case i is stored at GEOMETRY_VARIANTS[i % 4] (spacing, orientation).
    """
    n = _check_count("n", n, 2)
    n_test = _check_count("n_test", n_test, 0)
    seed = _check_count("seed", seed, 0)
    dims = _check_shape(shape)
    spacing_mm = _check_spacing(spacing)
    out = Path(out)

    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out} exists and is not a folder; pick an empty folder")
        if any(out.iterdir()) and not _is_previous_output(out):
            raise FileExistsError(
                f"{out} is not empty and does not hold a previous synthetic data set; "
                "pick an empty (or new) folder for the synthetic data"
            )
    for sub in _SUBDIRS:
        (out / sub).mkdir(parents=True, exist_ok=True)

    entries: dict[str, list[dict[str, str]]] = {"training": [], "test": []}
    keep: set[Path] = set()
    for split, count, img_dir, lbl_dir, prefix in (
        ("train", n, "imagesTr", "labelsTr", "vessel_"),
        ("test", n_test, "imagesTs", "labelsTs", "vessel_t"),
    ):
        for i in range(count):
            image, label = synthesize_volume(dims, _case_rng(seed, split, i))
            affine = np.diag([*spacing_mm, 1.0])
            if mixed_geometry:
                variant = GEOMETRY_VARIANTS[i % len(GEOMETRY_VARIANTS)]
                image, label, affine = regrid(image, label, affine, *variant)
            name = f"{prefix}{i:03d}.nii.gz"
            for sub, array in ((img_dir, image), (lbl_dir, label)):
                path = out / sub / name
                _atomic_write(path, _nifti_gz_bytes(array, affine))
                keep.add(path)
            entries["training" if split == "train" else "test"].append(
                {"image": f"./{img_dir}/{name}", "label": f"./{lbl_dir}/{name}"}
            )

    # Drop cases of an earlier, larger run (and temp files of a killed one) so the folder
    # matches dataset.json exactly.
    for folder in (out, *(out / sub for sub in _SUBDIRS)):
        for f in folder.iterdir():
            stale = _TMP_FILE.match(f.name) or (_CASE_FILE.match(f.name) and f not in keep)
            if stale and f.is_file():
                f.unlink()

    manifest = {
        "name": "SyntheticVessels",
        "description": (
            "Synthetic 3D vessel trees (branching tubes) in CT-like noise with background "
            "texture and a bias field, generated offline for quickstarts and tests."
        ),
        "tensorImageSize": "3D",
        "reference": "clinbundle synthetic generator",
        "licence": "CC0",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "vessel"},
        # SNOMED CT per label: what a DICOM SEG codes its segments with
        "label_codes": {"1": {"scheme": "SCT", "value": "59820001", "meaning": "Blood vessel"}},
        "numTraining": n,
        "numTest": n_test,
        "training": entries["training"],
        "test": entries["test"],
        "synth": {
            "seed": seed,
            "shape": list(dims),
            "spacing": list(spacing_mm),
            "mixed_geometry": mixed_geometry,
            "generator_version": GENERATOR_VERSION,
        },
    }
    manifest_path = out / "dataset.json"
    text = json.dumps(manifest, indent=2, sort_keys=True) + "\n"
    _atomic_write(manifest_path, text.encode("utf-8"))
    return manifest_path
