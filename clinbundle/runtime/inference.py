"""The one inference path, shared by every runtime.

PyTorch (training validation, the MLflow pyfunc, the parity reference) and ONNX Runtime (the
ONNX bundle, which the bento, the MAP app and the demo run) all call `segment` (or, on an
array already on the model's grid, `sliding_window_probabilities`) with a different
`Predictor`; geometry, normalisation, window layout, blending, softmax and post-processing are
therefore identical, and a difference in output can only come from the runtime that computes
the patches.

    input grid (any spacing, orientation) -> contract grid (geometry.Plan) -> normalise
    -> sliding window -> probabilities -> back to the input grid, one class at a time
    -> labels (argmax + post-processing), or all probabilities when asked for
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from clinbundle.runtime import geometry
from clinbundle.runtime.contract import InferenceContract, Normalization
from clinbundle.runtime.errors import InputError
from clinbundle.runtime.labels import labels_from_probabilities, postprocess

log = logging.getLogger("clinbundle.inference")

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
    """Normalise each channel of each volume over its last three (spatial) axes.

    One new full-size tensor, then in place: `image` may be the caller's array, and a whole
    CT's model grid is 230 MB a copy."""
    image = image.float()
    if norm.kind == "ct":
        if not norm.complete:
            raise InputError("normalization 'ct' lacks its training-set numbers (a_min..std)")
        lo, hi = float(norm.a_min), float(norm.a_max)  # type: ignore[arg-type]
        mean, std = float(norm.mean), float(norm.std)  # type: ignore[arg-type]
        return image.clamp(lo, hi).sub_(mean).div_(std)
    if norm.kind == "window":
        lo, hi = float(norm.a_min), float(norm.a_max)  # type: ignore[arg-type]
        return image.clamp(lo, hi).sub_(lo).div_(hi - lo)
    dims = (-3, -2, -1)
    mean = image.mean(dim=dims, keepdim=True)
    std = image.std(dim=dims, keepdim=True, unbiased=False)
    return (image - mean).div_(torch.where(std > 0, std, torch.ones_like(std)))


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
        probs = softmax_in_place(logits.float())
    return probs.cpu().numpy()


def softmax_in_place(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over axis 1, written over the logits.

    `torch.softmax` returns a second full-grid tensor: on a whole CT's model grid (358 x 358 x
    450) that is 460 MB more per two classes, 3.2 GB more for a 14-class model. Two classes take
    the sigmoid of the logit difference (p1 = sigmoid(l1 - l0), p0 = 1 - p1), a third of
    softmax's time there (0.05 vs 0.16 s, 2 cores); equal to `torch.softmax` within 2e-7.
    """
    if logits.shape[1] == 2:
        p0, p1 = logits[:, 0], logits[:, 1]
        torch.sub(p1, p0, out=p1).sigmoid_()
        torch.sub(1.0, p1, out=p0)
        return logits
    logits.sub_(logits.amax(dim=1, keepdim=True)).exp_()
    return logits.div_(logits.sum(dim=1, keepdim=True))


Output = Literal["labels", "probabilities"]


def segment(
    predictor: Predictor,
    volume: np.ndarray,
    contract: InferenceContract,
    affine: np.ndarray | None = None,
    output: Output = "probabilities",
    device: str | torch.device = "cpu",
    sw_batch_size: int | None = None,
) -> np.ndarray:
    """Raw float32 (N, C, D, H, W) on its own grid -> labels (N, D, H, W) uint8 or probabilities
    (N, K, D, H, W) float32 on that same grid.

    `affine` (4x4 voxel -> RAS mm, nibabel's convention; shared by the N volumes) says where the
    voxels are. Without it the array is taken to be on the contract's grid already (v1
    behaviour). With it, each volume is reoriented and resampled to the contract's grid, and
    the answer mapped back class by class, so full-grid float32 probabilities of every class
    are held only when `output="probabilities"` asks for them.
    """
    validate_volume(volume, contract)
    geo = contract.geometry
    if affine is None or (geo.spacing is None and geo.orientation is None):
        if affine is not None:
            check_spacing_range(geometry.spacing_of(geometry.check_affine(affine)), contract)
        probs = sliding_window_probabilities(
            predictor, volume, contract, device=device, sw_batch_size=sw_batch_size
        )
        if output == "probabilities":
            return probs
        return labels_from_probabilities(probs, contract.postprocessing, axis=1)
    affine = geometry.check_affine(affine)
    check_spacing_range(geometry.spacing_of(affine), contract)
    plan = geometry.plan(volume.shape, affine, geo.spacing, geo.orientation)
    log.info("geometry: %s", plan.describe())
    out = [
        _segment_one(predictor, v, contract, plan, output, device, sw_batch_size) for v in volume
    ]
    return np.stack(out)


def _segment_one(predictor, volume, contract, plan, output, device, sw_batch_size) -> np.ndarray:
    """One (C, D, H, W) volume through the plan; see `segment`."""
    image = plan.to_model(volume)
    probs = sliding_window_probabilities(
        predictor, image[None], contract, device=device, sw_batch_size=sw_batch_size
    )[0]
    del image
    if output == "probabilities":
        return np.stack([plan.channel_to_input(p) for p in probs])
    if probs.shape[0] == 2:
        # Two classes: interpolation weights sum to 1 and p0 = 1 - p1, so the resampled p1 >
        # p0 exactly when it is > 0.5; one channel resampled instead of two (2.6 s of a whole
        # 512 x 512 x 300 CT on 2 cores). Equal up to float rounding within ~1e-7 of 0.5.
        labels = (plan.channel_to_input(probs[1]) > 0.5).astype(np.uint8)
        return postprocess(labels, contract.postprocessing)
    best = plan.channel_to_input(probs[0])
    labels = np.zeros(best.shape, dtype=np.uint8)
    for k in range(1, probs.shape[0]):
        p = plan.channel_to_input(probs[k])
        better = p > best
        labels[better], best[better] = k, p[better]
    return postprocess(labels, contract.postprocessing)


def check_spacing_range(spacing: tuple[float, float, float], contract: InferenceContract) -> None:
    """A network trained natively on mixed spacings sees inputs inside the range it was trained
    on; outside it, warn or refuse as the contract says."""
    rng = contract.geometry.spacing_range
    if contract.geometry.spacing is not None or rng is None:
        return
    lo, hi, s = np.array(rng[0]) * 0.9, np.array(rng[1]) * 1.1, np.array(spacing)
    if np.all(s >= lo) and np.all(s <= hi):
        return
    msg = (
        f"input spacing {tuple(round(s, 3) for s in spacing)} mm is outside the training "
        f"spacings {rng[0]}..{rng[1]} mm (the network runs on each input's own grid)"
    )
    if contract.geometry.outside_range == "refuse":
        raise InputError(msg + "; resample the input first")
    log.warning("%s; results may be worse", msg)
