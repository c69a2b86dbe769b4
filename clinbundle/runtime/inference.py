"""The one sliding-window inference path, shared by every runtime.

PyTorch (training validation, the MLflow pyfunc, the parity reference) and ONNX Runtime (the
ONNX bundle, which the bento, the MAP app and the demo run) all call
`sliding_window_probabilities` with a different `Predictor`; normalisation, window layout,
blending and softmax are therefore identical, and a difference in output can only come from the
runtime that computes the patches.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from clinbundle.runtime.contract import InferenceContract, Normalization
from clinbundle.runtime.errors import InputError

#: Maps a batch of normalised patches (n, C_in, *roi) to logits (n, num_classes, *roi).
Predictor = Callable[[torch.Tensor], torch.Tensor]


def validate_volume(volume: object, contract: InferenceContract) -> np.ndarray:
    """Reject what the model cannot take, with a message that says how to fix it."""
    if isinstance(volume, torch.Tensor):
        raise InputError("expected a numpy array, got a torch.Tensor: pass tensor.numpy()")
    if not isinstance(volume, np.ndarray):
        raise InputError(f"expected a numpy array, got {type(volume).__name__}")
    c = contract.in_channels
    if volume.ndim != 5:
        raise InputError(
            f"expected a 5-D array (batch, {c}, D, H, W), got shape {volume.shape}; "
            f"add axes with volume[None, None] for a single 3-D volume"
        )
    if volume.shape[1] != c:
        raise InputError(
            f"expected {c} channel(s) on axis 1, got {volume.shape[1]} (shape {volume.shape})"
        )
    if min(volume.shape) == 0:
        raise InputError(f"volume has an empty axis: shape {volume.shape}")
    if volume.dtype != np.float32:
        raise InputError(
            f"expected float32 intensities, got {volume.dtype}; cast with volume.astype('float32')"
        )
    if not np.isfinite(volume).all():
        bad = int(volume.size - np.isfinite(volume).sum())
        raise InputError(f"volume holds {bad} NaN or Inf value(s); fix or mask them first")
    return volume


def normalize(image: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """Normalise each channel of each volume over its last three (spatial) axes."""
    image = image.float()
    if norm.kind == "window":
        lo, hi = float(norm.a_min), float(norm.a_max)  # type: ignore[arg-type]
        return (image.clamp(lo, hi) - lo) / (hi - lo)
    dims = (-3, -2, -1)
    mean = image.mean(dim=dims, keepdim=True)
    std = image.std(dim=dims, keepdim=True, unbiased=False)
    return (image - mean) / torch.where(std > 0, std, torch.ones_like(std))


def torch_predictor(module: torch.nn.Module, amp: bool = False) -> Predictor:
    """A PyTorch module as a Predictor (eval mode; autocast on CUDA when amp is asked for)."""
    module.eval()

    def predict(patches: torch.Tensor) -> torch.Tensor:
        if amp and patches.device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.float16):
                return module(patches).float()
        return module(patches)

    return predict


def sliding_window_probabilities(
    predictor: Predictor,
    volume: np.ndarray,
    contract: InferenceContract,
    device: str | torch.device = "cpu",
    sw_batch_size: int | None = None,
    overlap: float | None = None,
) -> np.ndarray:
    """Raw float32 volume (N, C_in, D, H, W) -> softmax probabilities (N, classes, D, H, W).

    Any spatial size works: MONAI pads volumes smaller than the roi and the roi is a multiple of
    the network's divisor. `sw_batch_size` and `overlap` override the contract for speed
    experiments; parity checks must leave them at the contract's values.
    """
    validate_volume(volume, contract)
    image = normalize(torch.from_numpy(volume).to(device), contract.normalization)
    with torch.inference_mode():
        logits = sliding_window_inference(
            image,
            roi_size=contract.roi_size,
            sw_batch_size=sw_batch_size or contract.sw_batch_size,
            predictor=predictor,
            overlap=contract.overlap if overlap is None else overlap,
            mode=contract.blend_mode,
        )
        probs = torch.softmax(logits.float(), dim=1)
    return probs.cpu().numpy()
