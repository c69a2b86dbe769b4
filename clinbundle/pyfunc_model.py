"""The MLflow pyfunc model, in MLflow's "models from code" style.

This file is logged as the model's code; it rebuilds the network from the contract, loads the
weights and runs the shared sliding-window path. It imports only clinbundle's runtime modules,
which are logged with the model (code_paths) so the model also loads where clinbundle is not
installed.
"""

from __future__ import annotations

import logging

import mlflow
import numpy as np
import torch

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import InputError
from clinbundle.runtime.geometry import affine_from_spacing
from clinbundle.runtime.inference import segment, torch_predictor
from clinbundle.runtime.networks import build_network

log = logging.getLogger("clinbundle.pyfunc")


class SegmentationModel(mlflow.pyfunc.PythonModel):
    """float32 (N, C_in, D, H, W) raw intensities -> float32 (N, classes, D, H, W) probabilities.

    model_config keys (overridable at load time): `device` ("auto", "cpu", "cuda") and
    `sw_batch_size`.
    """

    def load_context(self, context) -> None:
        with open(context.artifacts["contract"]) as f:
            self.contract = InferenceContract.from_json(f.read())
        config = context.model_config or {}
        want = config.get("device", "auto")
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        elif want == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("model_config device='cuda' but no CUDA device is available")
        self.device = torch.device(want)
        log.info(
            "clinbundle pyfunc: device=%s (model_config device=%s)", want, config.get("device")
        )
        self.sw_batch_size = config.get("sw_batch_size")
        net = build_network(self.contract.network)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        self.network = net.to(self.device).eval()

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """params: `affine` (16 numbers, row-major 4x4 voxel -> RAS mm) or `spacing` (3 numbers,
        mm; axis-aligned RAS) say where the voxels are; neither = on the contract's grid.
        `output`: "probabilities" (default) or "labels" (uint8, post-processed)."""
        if isinstance(model_input, dict) and len(model_input) == 1:  # serving JSON {"inputs": ..}
            model_input = next(iter(model_input.values()))
        params = params or {}
        return segment(
            torch_predictor(self.network),
            model_input,
            self.contract,
            affine=geometry_param(params),
            output=params.get("output") or "probabilities",
            device=self.device,
            sw_batch_size=self.sw_batch_size,
        )


def geometry_param(params: dict) -> np.ndarray | None:
    """The affine the MLflow params give (`affine` wins over `spacing`), or None."""
    affine, spacing = params.get("affine") or [], params.get("spacing") or []
    if len(affine):
        if len(affine) != 16:
            raise InputError(f"param affine needs 16 numbers (a row-major 4x4), got {len(affine)}")
        return np.asarray(affine, dtype=np.float64).reshape(4, 4)
    if len(spacing):
        return affine_from_spacing(spacing)
    return None


mlflow.models.set_model(SegmentationModel())
