"""Log a trained network as an MLflow pyfunc model that carries its inference contract.

The model takes raw float32 intensities (N, C_in, D, H, W) and returns float32 probabilities
(N, classes, D, H, W); the tensor signature lets MLflow reject other dtypes and channel counts
before the model runs. The contract goes into the model's metadata (and as contract.json), which
is what packaging reads for every later format.
"""

from __future__ import annotations

import importlib.metadata as md
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

import clinbundle
from clinbundle.runtime.contract import InferenceContract
from clinbundle.vendoring import vendor_runtime

PYFUNC_CODE = Path(clinbundle.__file__).parent / "pyfunc_model.py"


def signature(contract: InferenceContract) -> ModelSignature:
    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, contract.in_channels, -1, -1, -1))]),
        outputs=Schema([TensorSpec(f32, (-1, contract.num_classes, -1, -1, -1))]),
        # where the voxels are (see pyfunc_model.SegmentationModel.predict); empty = the
        # contract's grid, as before geometry existed
        params=ParamSchema(
            [
                ParamSpec("affine", "double", [], (-1,)),
                ParamSpec("spacing", "double", [], (-1,)),
                ParamSpec("output", "string", "probabilities"),
            ]
        ),
    )


def input_example(contract: InferenceContract) -> np.ndarray:
    """A small raw volume whose shape is deliberately not a multiple of the roi."""
    shape = (1, contract.in_channels, *(s // 2 + 3 for s in contract.roi_size))
    return np.random.default_rng(0).normal(100.0, 40.0, shape).astype(np.float32)


def pinned_requirements() -> list[str]:
    return [f"{d}=={md.version(d)}" for d in ("mlflow", "torch", "monai", "numpy", "pydantic")]


def log_segmentation_model(
    weights: Path | dict[str, torch.Tensor],
    contract: InferenceContract,
    name: str = "model",
    metadata: dict | None = None,
) -> ModelInfo:
    """Log weights (a state_dict, or a best_* checkpoint holding one under "model") as a pyfunc."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        if isinstance(weights, Path):
            weights = torch.load(weights, map_location="cpu", weights_only=True)["model"]
        torch.save(weights, tmp_path / "weights.pt")
        (tmp_path / "contract.json").write_text(contract.to_json())
        code = vendor_runtime(tmp_path / "code")
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(PYFUNC_CODE),
            artifacts={
                "weights": str(tmp_path / "weights.pt"),
                "contract": str(tmp_path / "contract.json"),
            },
            code_paths=[str(code)],
            signature=signature(contract),
            input_example=input_example(contract),
            pip_requirements=pinned_requirements(),
            model_config={"device": "auto", "sw_batch_size": contract.sw_batch_size},
            metadata={
                "inference_contract": contract.model_dump(mode="json"),
                "clinbundle_version": clinbundle.__version__,
                **(metadata or {}),
            },
        )
