"""MSD-style data sets: reading, validation before training, k-fold splits and transforms.

A data set is a folder with `dataset.json` (the Medical Segmentation Decathlon layout):
`training` lists {image, label} pairs (usually imagesTr/ and labelsTr/), `labels` names the
classes, and an optional `test` list of {image, label} pairs is the held-out set used to compare
models at promotion time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.data import partition_dataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    Lambdad,
    LoadImaged,
    Orientationd,
    RandCropByPosNegLabeld,
    RandFlipd,
    Spacingd,
)

from clinbundle.runtime.contract import Geometry, Normalization
from clinbundle.runtime.errors import DataError, InputError
from clinbundle.runtime.geometry import SPACING_RTOL, check_affine, plan, spacing_of
from clinbundle.runtime.inference import normalize
from clinbundle.training.config import DataConfig

Item = dict[str, str]


def _load_images() -> LoadImaged:
    """MONAI's loader of the image/label pair. LoadImage constructs every reader it knows, and
    with pydicom installed (the `map` extra) its nvImageCodec DICOM reader warns that its GPU
    decoder is missing: nothing to do with NIfTI training data, so that one warning is muted."""
    plugin_log = logging.getLogger("monai.data.nvimgcodec_pydicom_plugin")  # says it again
    level = plugin_log.level
    plugin_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "NvImgCodecPydicomReader: nvImageCodec decoder")
            return LoadImaged(keys=["image", "label"], image_only=True)
    finally:
        plugin_log.setLevel(level)


@dataclass
class Dataset:
    root: Path
    labels: dict[str, str]
    training: list[Item]
    test: list[Item]
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    spacings: list[tuple[float, ...]] = field(default_factory=list)
    affines: list[np.ndarray] = field(default_factory=list)
    sha256: str = ""
    modality: str | None = None
    label_codes: dict[str, dict] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def min_shape(self) -> tuple[int, int, int]:
        return tuple(int(x) for x in np.min(np.array(self.shapes), axis=0))  # type: ignore[return-value]

    @property
    def total_voxels(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes))


def _resolve(root: Path, entry: str) -> str:
    return str((root / entry).resolve())


def _item(root: Path, entry: dict) -> Item:
    """An image/label pair plus a case name (the image file name without .nii/.nii.gz)."""
    image = _resolve(root, entry["image"])
    case = Path(image).name.removesuffix(".gz").removesuffix(".nii")
    return {"image": image, "label": _resolve(root, entry["label"]), "case": case}


def read_dataset(root: Path | str | None) -> Dataset:
    """Read dataset.json; a missing or empty folder is one clear error, not a stack trace."""
    if root is None:
        raise DataError("no data folder given", "Pass --data DIR (an MSD-style folder).")
    root = Path(root)
    if root.is_file():
        raise DataError(f"{root} is a file; --data needs the folder that holds dataset.json")
    if not root.is_dir():
        raise DataError(
            f"data folder {root} does not exist",
            "Create one with `clinbundle data synth --out DIR` or point --data at your data.",
        )
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        what = "is empty" if not any(root.iterdir()) else "has no dataset.json"
        raise DataError(
            f"data folder {root} {what}",
            "An MSD-style folder needs imagesTr/, labelsTr/ and a dataset.json listing the pairs.",
        )
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta_path} is not valid JSON: {e}") from None
    problems = []
    labels = meta.get("labels")
    if not isinstance(labels, dict) or len(labels) < 2:
        problems.append(f"{meta_path}: 'labels' must map '0'..'K' to names, got {labels!r}")
        labels = {}
    training = meta.get("training") or []
    if not training:
        problems.append(f"{meta_path}: 'training' lists no image/label pairs")
    pairs: list[Item] = []
    for i, t in enumerate(training):
        if not isinstance(t, dict) or "image" not in t or "label" not in t:
            problems.append(f"{meta_path}: training[{i}] needs 'image' and 'label', got {t!r}")
            continue
        pairs.append(_item(root, t))
    test = [_item(root, t) for t in meta.get("test") or [] if isinstance(t, dict) and "label" in t]
    for item in pairs + test:
        for key in ("image", "label"):
            if not Path(item[key]).is_file():
                problems.append(f"{item[key]}: listed in dataset.json but missing")
    if problems:
        raise DataError(problems)
    modality = meta.get("modality")
    if isinstance(modality, dict):  # MSD: {"0": "CT"} (one entry per input channel)
        modality = modality.get("0")
    return Dataset(
        root=root,
        labels={str(k): v for k, v in labels.items()},
        training=pairs,
        test=test,
        modality=str(modality) if modality else None,
        label_codes={str(k): v for k, v in (meta.get("label_codes") or {}).items()},
    )


def _load(path: str, what: str, problems: list[str]) -> tuple[nib.Nifti1Image, np.ndarray] | None:
    """Header and voxels, read once; a truncated or foreign file becomes a problem line."""
    try:
        img = nib.load(path)
        return img, np.asarray(img.dataobj)
    except Exception as e:
        problems.append(f"{path}: cannot read the {what} ({type(e).__name__}: {e})")
        return None


def validate_dataset(ds: Dataset, items: list[Item] | None = None) -> Dataset:
    """Check every pair before any training starts and report all problems at once.

    Checks: readable files, 3-D, image/label shapes and affines equal, finite intensities, labels
    integral and inside 0..K-1. Fills `shapes`, `spacings` and a content hash of the data set.
    """
    problems: list[str] = []
    digest = hashlib.sha256()
    shapes, spacings, affines = [], [], []
    for item in items if items is not None else ds.training + ds.test:
        for key in ("image", "label"):
            digest.update(Path(item[key]).name.encode())
            digest.update(hashlib.sha256(Path(item[key]).read_bytes()).digest())
        img_read = _load(item["image"], "image", problems)
        lab_read = _load(item["label"], "label", problems)
        if img_read is None or lab_read is None:
            continue
        (img, data), (lab, labels) = img_read, lab_read
        name = Path(item["image"]).name
        if len(img.shape) != 3:
            problems.append(f"{name}: image must be 3-D, has shape {img.shape}")
            continue
        if img.shape != lab.shape:
            problems.append(f"{name}: image shape {img.shape} != label shape {lab.shape}")
            continue
        if not np.allclose(img.affine, lab.affine, atol=1e-3):
            problems.append(f"{name}: image and label affines differ")
        if not np.isfinite(data).all():
            problems.append(f"{name}: image holds NaN or Inf values")
        values = np.unique(labels)
        if not np.allclose(values, np.round(values)):
            problems.append(f"{Path(item['label']).name}: label values are not integers")
        bad = [v.item() for v in values if not 0 <= v < ds.num_classes]
        if bad:
            problems.append(
                f"{Path(item['label']).name}: label values {bad[:5]} outside 0..{ds.num_classes - 1}"
                f" (dataset.json names {ds.num_classes} classes)"
            )
        try:
            affines.append(check_affine(img.affine, name))
        except InputError as e:
            problems.append(str(e))
            continue
        shapes.append(tuple(int(s) for s in img.shape))
        spacings.append(spacing_of(img.affine))
    if problems:
        raise DataError(problems, f"Fix the files above in {ds.root} and run again.")
    ds.shapes, ds.spacings, ds.affines = shapes, spacings, affines
    ds.sha256 = digest.hexdigest()
    return ds


def resolve_geometry(ds: Dataset, cfg: DataConfig) -> tuple[Geometry, str, list[tuple]]:
    """The grid the network trains on, why, and each training volume's shape on it.

    `auto`: the training set's common spacing, or the median per axis when spacings differ
    (nnU-Net's rule); `native`: each volume's own grid (the spacing range is recorded, so
    inference can warn or refuse outside it); `[x, y, z]`: that spacing. Spacings are taken
    after reorientation to `data.orientation`, the axis order the network sees.
    """
    n = len(ds.training)
    grids = [
        plan(s, a, None, cfg.orientation).oriented
        for s, a in zip(ds.shapes[:n], ds.affines[:n], strict=True)
    ]
    spacings = np.array([g.spacing for g in grids])
    common = bool(np.allclose(spacings, spacings[0], rtol=SPACING_RTOL))
    target = cfg.target_spacing
    if target == "native":
        spacing, why = None, "native: each volume stays on its own grid"
        rng = (tuple(spacings.min(0).round(4)), tuple(spacings.max(0).round(4)))
        geo = Geometry(spacing=None, spacing_range=rng, orientation=cfg.orientation)
        return geo, why, [g.shape for g in grids]
    if target == "auto":
        spacing = tuple(float(x) for x in (spacings[0] if common else np.median(spacings, 0)))
        why = (
            f"auto: all {n} training volumes have this spacing"
            if common
            else f"auto: median of {n} training spacings ({spacings.min(0)}..{spacings.max(0)} mm)"
        )
    else:
        spacing, why = tuple(float(x) for x in target), "set by the user"
    geo = Geometry(spacing=spacing, orientation=cfg.orientation)
    shapes = [plan(g.shape, g.affine, spacing, None).model.shape for g in grids]
    return geo, why, shapes


def off_grid(ds: Dataset, geo: Geometry) -> tuple[bool, bool]:
    """Whether some training volume needs reorienting, and whether some needs resampling."""
    n = len(ds.training)
    grids = [
        plan(s, a, geo.spacing, geo.orientation)
        for s, a in zip(ds.shapes[:n], ds.affines[:n], strict=True)
    ]
    return any(g.reorients for g in grids), any(g.resamples for g in grids)


def check_patch_fits(
    ds: Dataset, patch: tuple[int, int, int], shapes: list[tuple] | None = None
) -> None:
    """Every training volume, on the grid the network trains on, holds one patch."""
    small = [
        f"{Path(it['image']).name} has shape {s} on the training grid"
        for it, s in zip(ds.training, shapes or ds.shapes, strict=False)
        if any(p > d for p, d in zip(patch, s, strict=True))
    ]
    if small:
        raise DataError(
            [f"patch size {patch} is larger than a volume: {s}" for s in small],
            f"Use a smaller patch, e.g. --set compute.patch_size=[{', '.join(map(str, ds.min_shape))}]"
            " (rounded down to the network's divisor), or compute.patch_size=auto.",
        )


def kfold_split(items: list[Item], folds: int, fold: int, seed: int) -> dict[str, list[Item]]:
    """Deterministic k-fold split (MONAI partition_dataset); fold `fold` is the validation set."""
    if len(items) < folds:
        raise DataError(
            f"{len(items)} training pairs cannot make {folds} folds",
            f"Use --set data.folds={max(2, len(items))} or add data.",
        )
    if not 0 <= fold < folds:
        raise DataError(f"data.fold={fold} is not in 0..{folds - 1}")
    parts = partition_dataset(items, num_partitions=folds, shuffle=True, seed=seed)
    val = parts[fold]
    train = [it for i, p in enumerate(parts) if i != fold for it in p]
    return {"train": train, "val": val}


def geometry_transforms(geo: Geometry, reorient: bool, resample: bool) -> list:
    """MONAI's Orientationd / Spacingd onto the contract's grid (only where some volume needs
    it, so a set already on the grid trains bit-for-bit as before)."""
    keys = ["image", "label"]
    out: list = []
    if reorient and geo.orientation:
        out.append(Orientationd(keys=keys, axcodes=geo.orientation))
    if resample and geo.spacing is not None:
        out.append(Spacingd(keys=keys, pixdim=geo.spacing, mode=("bilinear", "nearest")))
    return out


def train_transforms(
    patch: tuple[int, int, int], samples: int, norm: Normalization, to_grid: list | None = None
) -> Compose:
    """Load, onto the contract's grid, normalise the whole volume (as inference does), then
    draw random patches."""
    return Compose(
        [
            _load_images(),
            EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel"),
            *(to_grid or []),
            EnsureTyped(keys=["image", "label"], track_meta=False),
            Lambdad(keys="image", func=partial(normalize, norm=norm)),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=patch,
                pos=2,
                neg=1,
                num_samples=samples,
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
        ]
    )


def val_transforms() -> Compose:
    """Raw intensities on their own grid, affine kept: validation runs the shared inference
    path, which resamples and normalises itself and answers on the case's grid."""
    return Compose(
        [
            _load_images(),
            EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel"),
        ]
    )


def ct_normalization(ds: Dataset, items: list[Item], seed: int) -> Normalization:
    """nnU-Net's CT numbers from the training set: foreground intensities (label > 0), up to
    10,000 sampled per volume, give the 0.5 / 99.5 percentiles and, clipped to them, the mean
    and std that every runtime then applies."""
    rng = np.random.default_rng(seed)
    samples = []
    for item in items:
        image = np.asarray(nib.load(item["image"]).dataobj, dtype=np.float32)
        fg = image[np.asarray(nib.load(item["label"]).dataobj) > 0]
        if fg.size:
            samples.append(rng.choice(fg, size=min(fg.size, 10_000), replace=False))
    if not samples:
        raise DataError("normalization 'ct' needs foreground voxels; every training label is empty")
    values = np.concatenate(samples)
    lo, hi = (float(x) for x in np.percentile(values, [0.5, 99.5]))
    clipped = np.clip(values, lo, hi)
    std = float(clipped.std()) or 1.0
    return Normalization(kind="ct", a_min=lo, a_max=hi, mean=float(clipped.mean()), std=std)
