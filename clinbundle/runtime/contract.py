"""The inference contract: everything a runtime needs to turn a raw volume into probabilities.

Written once by training, stored with the model (MLflow model metadata, ONNX metadata_props,
bundle manifests) and read by every format, so no format re-types the roi, overlap,
normalisation or labels (the drift the MONAI Deploy UNETR example shows).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: v2 adds geometry, modality, the CT normalisation and post-processing; v1 contracts still
#: load (native grid, no post-processing) and keep their version so their hashes hold.
CONTRACT_VERSION = 2
Spacing = tuple[float, float, float]


class Normalization(BaseModel):
    """Intensity normalisation applied by the model itself, so every format takes raw volumes.

    `zscore`: per-volume (x - mean) / std, as MONAI's NormalizeIntensity (nonzero=False).
    `window`: clip to [a_min, a_max] and scale to [0, 1], as MONAI's ScaleIntensityRange with
    clip=True (the usual CT Hounsfield window).
    `ct`: nnU-Net's CT scheme: clip to [a_min, a_max] (the 0.5 / 99.5 percentiles of the training
    set's foreground intensities), then (x - mean) / std of that foreground. Training computes
    and stores the four numbers (`mean`/`std`/`a_min`/`a_max` left out = computed).
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["zscore", "window", "ct"] = "zscore"
    a_min: float | None = None
    a_max: float | None = None
    mean: float | None = None
    std: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _window_bounds(self) -> Normalization:
        if self.kind == "window" and (
            self.a_min is None or self.a_max is None or self.a_max <= self.a_min
        ):
            raise ValueError("normalization 'window' needs a_min < a_max")
        if self.kind == "ct" and None not in (self.a_min, self.a_max) and self.a_max <= self.a_min:
            raise ValueError("normalization 'ct' needs a_min < a_max")
        return self

    @property
    def complete(self) -> bool:
        """Whether a runtime can apply it (a `ct` scheme needs its four training-set numbers)."""
        return self.kind != "ct" or None not in (self.a_min, self.a_max, self.mean, self.std)


class Geometry(BaseModel):
    """The grid the network saw, so that every format puts an input on it and back.

    `spacing`: voxel size in mm of the training grid (the data set's common spacing, or the one
    it was resampled to); None = the network runs on each input's own grid (v1, or a mixed set
    trained natively by choice, whose spacings `spacing_range` records: inputs outside it get
    the `outside_range` treatment). `orientation`: axis codes the network saw (e.g. RAS); None =
    as stored. Images are resampled bilinearly; probabilities go back to the input grid
    bilinearly, and labels are their argmax there.
    """

    model_config = ConfigDict(extra="forbid")

    spacing: Spacing | None = None
    spacing_range: tuple[Spacing, Spacing] | None = None
    orientation: str | None = None
    outside_range: Literal["warn", "refuse"] = "warn"
    image_resampling: Literal["bilinear"] = "bilinear"
    output_resampling: Literal["bilinear"] = "bilinear"

    @field_validator("spacing")
    @classmethod
    def _positive(cls, v: Spacing | None) -> Spacing | None:
        if v is not None and min(v) <= 0:
            raise ValueError(f"spacing must be positive, got {v}")
        return v

    @field_validator("orientation")
    @classmethod
    def _axcodes(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.upper()
        axis = {"L": 0, "R": 0, "P": 1, "A": 1, "I": 2, "S": 2}
        if len(v) != 3 or sorted(axis.get(c, -1) for c in v) != [0, 1, 2]:
            raise ValueError(f"orientation must be three axis codes such as RAS or LPS, got {v!r}")
        return v


class CodedConcept(BaseModel):
    """A coded term (DICOM: CodingSchemeDesignator, CodeValue, CodeMeaning), e.g. SNOMED CT
    ("SCT", "59820001", "Blood vessel"), as dataset.json's `label_codes` gives it per label."""

    model_config = ConfigDict(extra="forbid")

    scheme: str
    value: str
    meaning: str


class PostProcessing(BaseModel):
    """What turns probabilities into the label map a clinician sees: argmax, then optionally
    only the largest connected component of each label listed (MONAI's
    KeepLargestConnectedComponent)."""

    model_config = ConfigDict(extra="forbid")

    largest_component: list[int] = []


class NetworkSpec(BaseModel):
    """Enough to rebuild the network without the training code: a MONAI class and its kwargs.

    `Ensemble`: kwargs are an `EnsembleSpec` (its members' networks and where their weights
    came from), so the ensemble's contract lists its members and every format rebuilds it.
    """

    model_config = ConfigDict(extra="forbid")

    family: Literal["DynUNet", "SegResNet", "UNet", "Ensemble"]
    kwargs: dict[str, Any]

    @model_validator(mode="after")
    def _ensemble_kwargs(self) -> NetworkSpec:
        if self.family == "Ensemble":
            EnsembleSpec.model_validate(self.kwargs)
        return self

    @property
    def ensemble(self) -> EnsembleSpec | None:
        return EnsembleSpec.model_validate(self.kwargs) if self.family == "Ensemble" else None


class EnsembleMember(BaseModel):
    """One member of an ensemble: its network and the registered model its weights came from."""

    model_config = ConfigDict(extra="forbid")

    network: NetworkSpec
    model_uri: str
    run_id: str
    model_version: str | None = None
    checkpoint: str  # the file the member's weights came from, as the run logged it
    weights_sha256: str

    @field_validator("network")
    @classmethod
    def _not_nested(cls, v: NetworkSpec) -> NetworkSpec:
        if v.family == "Ensemble":
            raise ValueError("an ensemble member cannot itself be an ensemble")
        return v


class EnsembleSpec(BaseModel):
    """Members whose softmax is averaged per patch, optionally over mirrored copies of the
    patch (test-time mirroring along `mirror_axes`, 0..2 = D, H, W: every combination of
    flips, as nnU-Net does), so one patch costs `forward_passes` member forward passes."""

    model_config = ConfigDict(extra="forbid")

    members: list[EnsembleMember] = Field(..., min_length=2)
    mirror_axes: list[int] = []

    @field_validator("mirror_axes")
    @classmethod
    def _axes(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v) or not set(v) <= {0, 1, 2}:
            raise ValueError(f"mirror_axes must be distinct spatial axes 0, 1, 2; got {v}")
        return sorted(v)

    @property
    def forward_passes(self) -> int:
        return len(self.members) * 2 ** len(self.mirror_axes)


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
    modality: str | None = None  # dataset.json's, e.g. CT or MR; None = any
    #: per foreground label, from dataset.json's `label_codes`; a label without one is coded as
    #: a generic anatomical structure in a DICOM SEG (never guessed from its name)
    label_codes: dict[str, CodedConcept] = {}
    geometry: Geometry = Geometry()
    postprocessing: PostProcessing = PostProcessing()

    @model_validator(mode="after")
    def _consistent(self) -> InferenceContract:
        if self.contract_version not in (1, CONTRACT_VERSION):
            raise ValueError(
                f"contract_version {self.contract_version} is not 1 or {CONTRACT_VERSION}"
            )
        bad_labels = [
            v for v in self.postprocessing.largest_component if not 0 < v < self.num_classes
        ]
        if bad_labels:
            raise ValueError(
                f"postprocessing.largest_component names labels {bad_labels} outside 1..{self.num_classes - 1}"
            )
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
