"""The shared sliding-window path and its input checks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clinbundle.runtime.contract import InferenceContract, Normalization
from clinbundle.runtime.errors import InputError
from clinbundle.runtime.inference import (
    normalize,
    sliding_window_probabilities,
    softmax_in_place,
    torch_predictor,
)
from clinbundle.runtime.networks import build_network, network_spec, spatial_divisor


@pytest.fixture(scope="module")
def model_and_contract():
    spec = network_spec("dynunet", 1, 2, [8, 16, 32])
    torch.manual_seed(0)
    contract = InferenceContract(
        network=spec,
        num_classes=2,
        labels={"0": "background", "1": "vessel"},
        roi_size=(16, 16, 16),
        spatial_divisor=spatial_divisor(spec),
    )
    return build_network(spec), contract


@pytest.mark.parametrize("shape", [(1, 1, 37, 41, 23), (2, 1, 20, 20, 20), (1, 1, 9, 12, 7)])
def test_any_shape_gives_probabilities(model_and_contract, shape) -> None:
    net, contract = model_and_contract
    x = np.random.default_rng(0).normal(100, 30, shape).astype(np.float32)
    p = sliding_window_probabilities(torch_predictor(net), x, contract)
    assert p.shape == (shape[0], 2, *shape[2:]) and p.dtype == np.float32
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_batch_items_are_independent(model_and_contract) -> None:
    net, contract = model_and_contract
    rng = np.random.default_rng(1)
    a, b = (rng.normal(100, 30, (1, 1, 24, 24, 24)).astype(np.float32) for _ in range(2))
    both = sliding_window_probabilities(torch_predictor(net), np.concatenate([a, b]), contract)
    alone = sliding_window_probabilities(torch_predictor(net), b, contract)
    np.testing.assert_allclose(both[1:], alone, atol=1e-5)


@pytest.mark.parametrize(
    ("volume", "needle"),
    [
        (np.zeros((1, 1, 8, 8, 8), np.float64), "float32"),
        (np.zeros((1, 1, 8, 8, 8), np.int16), "float32"),
        (np.zeros((1, 2, 8, 8, 8), np.float32), "1 channel"),
        (np.zeros((8, 8, 8), np.float32), "5-D"),
        (np.full((1, 1, 8, 8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((1, 1, 0, 8, 8), np.float32), "empty"),
        (torch.zeros(1, 1, 8, 8, 8), "torch.Tensor"),
    ],
)
def test_bad_input_is_rejected_with_a_reason(model_and_contract, volume, needle) -> None:
    net, contract = model_and_contract
    with pytest.raises(InputError, match=needle):
        sliding_window_probabilities(torch_predictor(net), volume, contract)


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_softmax_in_place_is_torch_softmax_over_the_logits_own_memory(classes: int) -> None:
    """Also on a strided view (MONAI crops its padded output to the input) and where a
    log-probability ensemble gives -inf for a class."""
    torch.manual_seed(classes)
    padded = 20 * torch.randn(2, classes, 12, 13, 14)
    logits = padded[:, :, 1:9, 2:11, 3:12]
    logits[0, 0, 0, 0, :3] = float("-inf")
    expected = torch.softmax(logits, dim=1)
    out = softmax_in_place(logits)
    assert out.data_ptr() == logits.data_ptr()
    torch.testing.assert_close(out, expected, rtol=0, atol=3e-7)
    assert torch.equal(out[0, 0, 0, 0, :3], torch.zeros(3))


def test_normalization() -> None:
    x = torch.tensor(np.random.default_rng(0).normal(50, 10, (1, 1, 8, 8, 8)), dtype=torch.float32)
    z = normalize(x, Normalization())
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1) < 1e-4
    w = normalize(x, Normalization(kind="window", a_min=40, a_max=60))
    assert float(w.min()) >= 0 and float(w.max()) <= 1
    flat = normalize(torch.ones(1, 1, 4, 4, 4), Normalization())
    assert torch.isfinite(flat).all()
    before = x.clone()
    ct = normalize(x, Normalization(kind="ct", a_min=30, a_max=70, mean=50, std=10))
    torch.testing.assert_close(ct, (x.clamp(30, 70) - 50) / 10)
    assert torch.equal(x, before)  # the caller's volume is never written, whatever the kind


def test_contract_rejects_roi_off_divisor() -> None:
    spec = network_spec("dynunet", 1, 2, [8, 16, 32])
    with pytest.raises(ValueError, match="multiple of 4"):
        InferenceContract(
            network=spec,
            num_classes=2,
            labels={"0": "b", "1": "v"},
            roi_size=(18, 16, 16),
            spatial_divisor=4,
        )
