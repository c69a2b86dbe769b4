"""Tests for the synthetic vessel data generator (clinbundle.training.synth)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from clinbundle.training.synth import synthesize_volume, write_dataset

SHAPE = (40, 44, 48)  # deliberately not a cube: catches axis mix-ups


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "ds"
    return write_dataset(out, n=3, shape=SHAPE, seed=7, n_test=1, spacing=(0.8, 0.9, 1.5))


def test_same_seed_same_bytes_and_different_seed_differs(tmp_path: Path) -> None:
    kwargs = {"n": 2, "shape": (24, 24, 24), "n_test": 1}
    a = write_dataset(tmp_path / "a", seed=3, **kwargs).parent
    b = write_dataset(tmp_path / "b", seed=3, **kwargs).parent
    c = write_dataset(tmp_path / "c", seed=4, **kwargs).parent
    da, db, dc = _digests(a), _digests(b), _digests(c)
    assert len(da) == 2 * 2 + 2 * 1 + 1
    assert da == db
    for name in da:
        if name.startswith("images"):
            assert da[name] != dc[name], name
    # Rewriting over a previous synthetic output is allowed and reproduces the same bytes.
    write_dataset(a, seed=3, **kwargs)
    assert _digests(a) == db


def test_case_does_not_depend_on_dataset_size(tmp_path: Path) -> None:
    small = write_dataset(tmp_path / "s", n=2, shape=(20, 20, 20), n_test=0).parent
    large = write_dataset(tmp_path / "l", n=3, shape=(20, 20, 20), n_test=1).parent
    for name in ("imagesTr/vessel_000.nii.gz", "labelsTr/vessel_001.nii.gz"):
        assert (small / name).read_bytes() == (large / name).read_bytes()


def test_rewrite_with_fewer_cases_drops_stale_files(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out, n=3, shape=(16, 16, 16), n_test=1)
    write_dataset(out, n=2, shape=(16, 16, 16), n_test=0)
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [
        "vessel_000.nii.gz",
        "vessel_001.nii.gz",
    ]
    assert not any((out / "imagesTs").iterdir())


def test_dataset_json_structure(dataset: Path) -> None:
    assert dataset.name == "dataset.json"
    text = dataset.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    meta = json.loads(text)
    assert meta["name"] == "SyntheticVessels"
    assert meta["tensorImageSize"] == "3D"
    assert meta["modality"] == {"0": "CT"}
    assert meta["labels"] == {"0": "background", "1": "vessel"}
    assert meta["label_codes"]["1"] == {
        "scheme": "SCT",
        "value": "59820001",
        "meaning": "Blood vessel",
    }
    assert meta["numTraining"] == 3 and len(meta["training"]) == 3
    assert meta["numTest"] == 1 and len(meta["test"]) == 1
    assert meta["training"][0] == {
        "image": "./imagesTr/vessel_000.nii.gz",
        "label": "./labelsTr/vessel_000.nii.gz",
    }
    assert meta["test"][0] == {
        "image": "./imagesTs/vessel_t000.nii.gz",
        "label": "./labelsTs/vessel_t000.nii.gz",
    }
    assert meta["synth"] == {
        "seed": 7,
        "shape": list(SHAPE),
        "spacing": [0.8, 0.9, 1.5],
        "mixed_geometry": False,
        "generator_version": 1,
    }
    for entry in meta["training"] + meta["test"]:
        for key in ("image", "label"):
            assert (dataset.parent / entry[key]).is_file()


def test_volumes_are_plausible_and_not_trivial(dataset: Path) -> None:
    meta = json.loads(dataset.read_text(encoding="utf-8"))
    for entry in meta["training"] + meta["test"]:
        img_nii = nib.load(dataset.parent / entry["image"])
        lbl_nii = nib.load(dataset.parent / entry["label"])
        assert img_nii.get_data_dtype() == np.float32
        assert lbl_nii.get_data_dtype() == np.uint8
        np.testing.assert_allclose(img_nii.affine, np.diag([0.8, 0.9, 1.5, 1.0]), atol=1e-6)
        assert int(img_nii.header["sform_code"]) == 1 and int(img_nii.header["qform_code"]) == 1
        image = np.asarray(img_nii.dataobj)
        label = np.asarray(lbl_nii.dataobj)
        assert image.dtype == np.float32 and label.dtype == np.uint8
        assert image.shape == SHAPE and label.shape == SHAPE
        assert set(np.unique(label)) <= {0, 1}

        vessel = label.astype(bool)
        assert 0.005 <= vessel.mean() <= 0.30
        mean_vessel, mean_bg = float(image[vessel].mean()), float(image[~vessel].mean())
        assert mean_vessel > mean_bg + 2 * float(image[~vessel].std())
        assert 50 < mean_bg < 200, "raw CT-like scale, not normalised"

        pred = image > (mean_vessel + mean_bg) / 2
        dice = 2 * np.count_nonzero(pred & vessel) / (pred.sum() + vessel.sum())
        assert 0.3 < dice < 0.95, f"threshold Dice {dice:.3f} for {entry['image']}"


def test_synthesize_volume_direct() -> None:
    image, label = synthesize_volume((16, 20, 24), np.random.default_rng(0))
    assert image.shape == label.shape == (16, 20, 24)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert label.mean() >= 0.005
    again, _ = synthesize_volume((16, 20, 24), np.random.default_rng(0))
    np.testing.assert_array_equal(image, again)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n": 1}, "n must be >= 2"),
        ({"shape": (16, 15, 16)}, "shape"),
        ({"shape": (32, 32)}, "shape"),
        ({"n_test": -1}, "n_test"),
        ({"seed": -1}, "seed"),
        ({"spacing": (1.0, 0.0, 1.0)}, "spacing"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        write_dataset(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists(), "validation must happen before touching disk"


def test_synthesize_volume_rejects_small_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        synthesize_volume((8, 64, 64), np.random.default_rng(0))


def test_refuses_foreign_non_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("precious", encoding="utf-8")
    with pytest.raises(FileExistsError, match="empty"):
        write_dataset(tmp_path, n=2, shape=(16, 16, 16))
    assert (tmp_path / "notes.txt").read_text(encoding="utf-8") == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]

    foreign = tmp_path / "other"
    foreign.mkdir()
    (foreign / "dataset.json").write_text('{"name": "Task08_HepaticVessel"}', encoding="utf-8")
    with pytest.raises(FileExistsError, match=re.escape(str(foreign))):
        write_dataset(foreign, n=2, shape=(16, 16, 16))


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    path = write_dataset(tmp_path, n=2, shape=(16, 16, 16), n_test=0)
    assert path == tmp_path / "dataset.json"


def test_interrupted_run_is_recognised_and_cleaned(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "imagesTr" / "vessel_000.nii.gz").write_bytes(b"partial")
    leftover = tmp_path / "imagesTr" / ".vessel_001.nii.gz.123.deadbeef.tmp"
    leftover.write_bytes(b"partial")
    write_dataset(tmp_path, n=2, shape=(16, 16, 16), n_test=0)
    assert not leftover.exists()
    assert (tmp_path / "imagesTr" / "vessel_000.nii.gz").read_bytes() != b"partial"


def test_mixed_geometry_stores_the_same_anatomy_at_other_spacings_and_orientations(
    tmp_path: Path,
) -> None:
    """Case i takes GEOMETRY_VARIANTS[i % 4]; the world extent of each case stays the same."""
    from clinbundle.runtime.geometry import spacing_of
    from clinbundle.training.synth import GEOMETRY_VARIANTS

    write_dataset(tmp_path / "d", n=4, shape=(32, 32, 32), seed=1, n_test=0, mixed_geometry=True)
    for i, (spacing, axcodes) in enumerate(GEOMETRY_VARIANTS):
        img = nib.load(tmp_path / "d" / "imagesTr" / f"vessel_{i:03d}.nii.gz")
        lab = nib.load(tmp_path / "d" / "labelsTr" / f"vessel_{i:03d}.nii.gz")
        assert "".join(nib.aff2axcodes(img.affine)) == axcodes
        assert np.allclose(spacing_of(img.affine), spacing)
        assert np.allclose(np.array(img.shape) * spacing, 32, atol=max(spacing))
        assert np.array_equal(img.affine, lab.affine) and img.shape == lab.shape
        assert set(np.unique(np.asarray(lab.dataobj))) <= {0, 1}
