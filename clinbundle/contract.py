"""The inference contract: everything a runtime needs to turn a raw volume into probabilities.

Written once by training, stored with the model (MLflow model metadata, ONNX metadata_props,
bundle manifests) and read by every format, so no format re-types the roi, overlap,
normalisation or labels (the drift the MONAI Deploy UNETR example shows).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

CONTRACT_VERSION = 1


class Normalization(BaseModel):
    """Intensity normalisation applied by the model itself, so every format takes raw volumes.

    `zscore`: per-volume (x - mean) / std, as MONAI's NormalizeIntensity (nonzero=False).
    `window`: clip to [a_min, a_max] and scale to [0, 1], as MONAI's ScaleIntensityRange with
    clip=True (the usual CT Hounsfield window).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["zscore", "window"] = "zscore"
    a_min: float | None = None
    a_max: float | None = None

    @model_validator(mode="after")
    def _window_bounds(self) -> Normalization:
        if self.kind == "window" and (
            self.a_min is None or self.a_max is None or self.a_max <= self.a_min
        ):
            raise ValueError("normalization 'window' needs a_min < a_max")
        return self


class NetworkSpec(BaseModel):
    """Enough to rebuild the network without the training code: a MONAI class and its kwargs."""

    model_config = ConfigDict(extra="forbid")

    family: Literal["DynUNet", "SegResNet", "UNet"]
    kwargs: dict[str, Any]


class InferenceContract(BaseModel):
    """Input/output contract and sliding-window settings of a segmentation model."""

    model_config = ConfigDict(extra="forbid")

    contract_version: int = CONTRACT_VERSION
    network: NetworkSpec
    in_channels: int = Field(1, ge=1)
    num_classes: int = Field(..., ge=2)
    labels: dict[str, str]
    roi_size: tuple[int, int, int]
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    spatial_divisor: int = Field(1, ge=1)
    normalization: Normalization = Normalization()
    input_dtype: Literal["float32"] = "float32"
    output: Literal["softmax_probabilities"] = "softmax_probabilities"

    @model_validator(mode="after")
    def _consistent(self) -> InferenceContract:
        bad = [s for s in self.roi_size if s % self.spatial_divisor]
        if bad:
            raise ValueError(
                f"roi_size {self.roi_size} must be a multiple of {self.spatial_divisor} "
                f"for {self.network.family}"
            )
        if sorted(self.labels, key=int) != [str(i) for i in range(self.num_classes)]:
            raise ValueError(f"labels must name classes 0..{self.num_classes - 1}: {self.labels}")
        return self

    @property
    def model_family(self) -> str:
        return self.network.family

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> InferenceContract:
        return cls.model_validate_json(text)
