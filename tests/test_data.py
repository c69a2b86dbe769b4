"""Data validation reports every problem at once, with file names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clinbundle.runtime.errors import DataError
from clinbundle.training.data import kfold_split, read_dataset, validate_dataset


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _rewrite(path: Path, fn) -> None:
    img = nib.load(path)
    data = fn(np.asarray(img.dataobj).copy())
    nib.save(nib.Nifti1Image(data, img.affine), path)


def test_all_problems_reported_at_once(tmp_path: Path, synth_data: Path) -> None:
    root = _copy(synth_data, tmp_path / "bad")
    _rewrite(
        root / "imagesTr/vessel_000.nii.gz", lambda a: np.where(a > 0, np.nan, a).astype(np.float32)
    )
    _rewrite(root / "labelsTr/vessel_001.nii.gz", lambda a: (a * 3).astype(np.uint8))
    _rewrite(root / "labelsTr/vessel_002.nii.gz", lambda a: a[:, :, :-4])
    (root / "imagesTr/vessel_003.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError) as e:
        validate_dataset(read_dataset(root))
    msg = str(e.value)
    assert len(e.value.problems) == 4, msg
    assert "vessel_000.nii.gz: image holds NaN" in msg
    assert "vessel_001.nii.gz: label values [3]" in msg
    assert "vessel_002.nii.gz: image shape (40, 40, 40) != label shape (40, 40, 36)" in msg
    assert "vessel_003.nii.gz: cannot read the image" in msg


def test_missing_empty_and_incomplete_folders(tmp_path: Path, synth_data: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_dataset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        read_dataset(tmp_path / "empty")
    root = _copy(synth_data, tmp_path / "gone")
    (root / "labelsTr/vessel_004.nii.gz").unlink()
    with pytest.raises(DataError, match="vessel_004.nii.gz: listed in dataset.json but missing"):
        read_dataset(root)
    meta = json.loads((root / "dataset.json").read_text())
    (root / "dataset.json").write_text(json.dumps(meta | {"training": []}))
    with pytest.raises(DataError, match="lists no image/label pairs"):
        read_dataset(root)


def test_kfold_is_deterministic_and_disjoint(synth_data: Path) -> None:
    items = read_dataset(synth_data).training
    a, b = kfold_split(items, 3, 1, seed=0), kfold_split(items, 3, 1, seed=0)
    assert a == b
    names = lambda s: {i["case"] for i in s}  # noqa: E731
    assert not names(a["train"]) & names(a["val"])
    assert names(a["train"]) | names(a["val"]) == names(items)
    with pytest.raises(DataError, match="cannot make 10 folds"):
        kfold_split(items, 10, 0, 0)
