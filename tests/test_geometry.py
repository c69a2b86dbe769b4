"""Geometry in the one inference path: contract v2, reorientation, resampling and the way back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clinbundle.runtime.contract import Geometry, InferenceContract, PostProcessing
from clinbundle.runtime.errors import InputError
from clinbundle.runtime.geometry import check_affine, plan, reorient
from clinbundle.runtime.inference import segment, torch_predictor
from clinbundle.runtime.labels import labels_from_probabilities
from clinbundle.runtime.networks import build_network, network_spec, spatial_divisor
from clinbundle.training.synth import regrid, synthesize_volume


def _contract(**geometry) -> InferenceContract:
    spec = network_spec("dynunet", 1, 2, [8, 16, 32])
    return InferenceContract(
        network=spec,
        num_classes=2,
        labels={"0": "background", "1": "vessel"},
        roi_size=(16, 16, 16),
        spatial_divisor=spatial_divisor(spec),
        geometry=Geometry(**geometry),
    )


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return torch_predictor(build_network(_contract().network))


@pytest.fixture(scope="module")
def vessels() -> tuple[np.ndarray, np.ndarray]:
    image, label = synthesize_volume((24, 28, 20), np.random.default_rng(0))
    return image, label


def test_a_v1_contract_still_loads_and_keeps_its_version() -> None:
    v2 = json.loads(_contract().to_json())
    v1 = {k: v for k, v in v2.items() if k not in ("geometry", "modality", "postprocessing")}
    v1.pop("label_codes")
    v1["contract_version"] = 1
    loaded = InferenceContract.model_validate(v1)
    assert loaded.contract_version == 1 and loaded.geometry == Geometry()


@pytest.mark.parametrize(
    "affine, needle",
    [
        (np.zeros((4, 4)), "zero voxel spacing"),
        (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN or Inf"),
        ([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], "singular"),
        (np.eye(3), "4x4"),
    ],
)
def test_bad_affines_are_input_errors(affine, needle) -> None:
    with pytest.raises(InputError, match=needle):
        check_affine(affine)


def test_reorientation_is_exact_and_reversible(vessels) -> None:
    image, _ = vessels
    _, _, lps_affine = regrid(image, image.astype(np.uint8), np.eye(4), (1.0, 1.0, 1.0), "LPS")
    p = plan(image.shape, lps_affine, (1.0, 1.0, 1.0), "RAS")
    assert p.reorients and not p.resamples
    there = p.to_model(image[None])
    assert np.array_equal(reorient(there, p.back)[0], image)


def test_an_input_on_the_contract_grid_gives_what_an_array_without_geometry_gives(
    net, vessels
) -> None:
    image, _ = vessels
    contract = _contract(spacing=(1.0, 1.0, 1.0), orientation="RAS")
    volume = image[None, None]
    bare = segment(net, volume, contract)
    placed = segment(net, volume, contract, affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    assert np.array_equal(bare, placed)


def test_an_lps_input_gets_the_ras_answer_mapped_back(net, vessels) -> None:
    """The network sees the same RAS array either way, so the answers agree voxel by voxel
    once the LPS one is flipped back."""
    image, _ = vessels
    contract = _contract(spacing=(1.0, 1.0, 1.0), orientation="RAS")
    ras = segment(net, image[None, None], contract, affine=np.eye(4))
    lps_image = image[::-1, ::-1].copy()
    lps_affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    lps_affine[:3, 3] = [image.shape[0] - 1, image.shape[1] - 1, 0]
    lps = segment(net, lps_image[None, None], contract, affine=lps_affine)
    np.testing.assert_allclose(lps[0][:, ::-1, ::-1], ras[0], atol=1e-6)


def test_resampled_input_comes_back_on_its_own_grid_as_labels_or_probabilities(
    net, vessels
) -> None:
    image, label = vessels
    contract = _contract(spacing=(1.0, 1.0, 1.0), orientation="RAS")
    aniso, _, affine = regrid(image, label, np.eye(4), (0.5, 0.5, 2.5), "RAS")
    probs = segment(net, aniso[None, None], contract, affine=affine)
    labels = segment(net, aniso[None, None], contract, affine=affine, output="labels")
    assert probs.shape == (1, 2, *aniso.shape) and labels.shape == (1, *aniso.shape)
    assert labels.dtype == np.uint8
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    # labels are the argmax of the probabilities mapped back (ties aside: two classes resample
    # only p1 and threshold it at 0.5, which differs from comparing both only at float rounding)
    differ = labels_from_probabilities(probs[0]) != labels[0]
    assert differ.mean() < 1e-3
    assert np.all(np.abs(probs[0, 1] - probs[0, 0])[differ] < 1e-5)


def test_a_native_contract_warns_or_refuses_outside_its_spacing_range(net, vessels, caplog):
    image, _ = vessels
    volume, affine = image[None, None], np.diag([3.0, 3.0, 3.0, 1.0])
    warn = _contract(spacing_range=((0.8, 0.8, 1.0), (1.0, 1.0, 1.5)))
    segment(net, volume, warn, affine=affine, output="labels")
    assert "outside the training spacings" in caplog.text
    refuse = _contract(spacing_range=((0.8, 0.8, 1.0), (1.0, 1.0, 1.5)), outside_range="refuse")
    with pytest.raises(InputError, match="outside the training spacings"):
        segment(net, volume, refuse, affine=affine, output="labels")


def test_largest_component_post_processing_keeps_one_blob() -> None:
    probs = np.zeros((2, 12, 12, 12), dtype=np.float32)
    probs[0] = 1.0
    probs[:, 1:4, 1:4, 1:4] = [[[[0.0]]], [[[1.0]]]]  # 27 voxels
    probs[:, 8:10, 8:10, 8:10] = [[[[0.0]]], [[[1.0]]]]  # 8 voxels
    assert labels_from_probabilities(probs).sum() == 35
    kept = labels_from_probabilities(probs, PostProcessing(largest_component=[1]))
    assert kept.sum() == 27 and kept[1:4, 1:4, 1:4].all()


def test_the_model_grid_survives_an_affine_read_back_from_a_nifti_header() -> None:
    """35 slices of 1.3 mm are 45.5 mm: float32 header noise must not move the grid."""
    import nibabel as nib

    affine = np.diag([0.9, 0.9, 1.3, 1.0])
    stored = nib.Nifti1Image.from_bytes(nib.Nifti1Image(np.zeros((37, 41, 35)), affine).to_bytes())
    assert not np.array_equal(stored.affine, affine)  # float32 in the header
    a = plan((37, 41, 35), affine, (1.0, 1.0, 1.0), "RAS").model
    b = plan((37, 41, 35), stored.affine, (1.0, 1.0, 1.0), "RAS").model
    assert a.shape == b.shape == (33, 37, 46)
    np.testing.assert_allclose(a.affine, b.affine, atol=1e-5)


def _oblique(spacing: tuple[float, float, float]) -> np.ndarray:
    """An LPS-ish affine rotated 20 degrees about z, origin off zero, voxel size `spacing`."""
    c, s = np.cos(np.radians(20)), np.sin(np.radians(20))
    a = np.eye(4)
    a[:3, :3] = np.array([[-c, s, 0], [-s, -c, 0], [0, 0, 1]]) @ np.diag(spacing)
    a[:3, 3] = [120.0, -87.5, 33.0]
    return a


@pytest.mark.parametrize(
    "shape, spacing",
    [
        ((40, 37, 23), (0.7, 0.7, 1.5)),  # a CT's spacing, up and down at once
        ((30, 31, 17), (0.3, 0.25, 5.0)),  # > 2x down in plane, 5x up across slices
        ((17, 19, 21), (1.3, 1.3, 1.3)),
    ],
)
def test_resampling_to_the_model_grid_and_back_is_monais_spatial_resample(shape, spacing):
    """The fast path (trilinear upsampling at the exact spacing ratio) against MONAI's
    SpatialResample (a sampling grid and grid_sample, border padding) on the same grids, both
    ways, on an oblique input: equal to float32 rounding of grid_sample's coordinates."""
    from clinbundle.runtime.geometry import _spatial_resample, corner_aligned_scales, resample

    p = plan(shape, _oblique(spacing), (1.0, 1.0, 1.0), "RAS")
    assert p.resamples
    image = reorient(np.random.default_rng(0).normal(0, 1, (1, *shape)).astype(np.float32), p.ornt)
    assert corner_aligned_scales(p.oriented, p.model) is not None
    there = resample(image, p.oriented, p.model)
    assert there.shape == (1, *p.model.shape) and there.dtype == np.float32
    np.testing.assert_allclose(
        there, _spatial_resample(image, p.oriented, p.model, "bilinear"), atol=5e-5
    )
    back = resample(there, p.model, p.oriented)
    np.testing.assert_allclose(
        back, _spatial_resample(there, p.model, p.oriented, "bilinear"), atol=5e-5
    )


def test_grids_that_are_not_one_field_of_view_resample_through_monai() -> None:
    """A shifted or rotated destination is no pure re-gridding: no scales, MONAI's path."""
    from clinbundle.runtime.geometry import Grid, corner_aligned_scales

    src = Grid((10, 10, 10), _oblique((1.0, 1.0, 2.0)))
    assert corner_aligned_scales(src, src) == (1.0, 1.0, 1.0)
    shifted = src.affine.copy()
    shifted[:3, 3] += 0.3
    assert corner_aligned_scales(src, Grid((10, 10, 10), shifted)) is None
    rotated = np.diag([1.0, 1.0, 2.0, 1.0])
    rotated[:3, 3] = src.affine[:3, 3]
    assert corner_aligned_scales(src, Grid((10, 10, 10), rotated)) is None
