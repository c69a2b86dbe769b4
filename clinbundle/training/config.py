"""The training configuration: one YAML schema validated by pydantic, with `--set` overrides."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from clinbundle.runtime.contract import Normalization
from clinbundle.runtime.errors import ConfigError

Auto = Literal["auto"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    root: Path | None = None
    folds: int = Field(5, ge=2)
    fold: int = Field(0, ge=0)
    samples_per_volume: int = Field(2, ge=1)
    num_workers: int = Field(0, ge=0)
    # the grid the network trains on (and every format resamples inputs to): auto | native |
    # [x, y, z] mm; auto = the common spacing, or the median when spacings differ (nnU-Net)
    target_spacing: Literal["auto", "native"] | tuple[float, float, float] = "auto"
    orientation: str | None = "RAS"  # axis codes volumes are reoriented to; null = as stored

    @field_validator("target_spacing")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, tuple) and min(v) <= 0:
            raise ValueError("target_spacing must be positive (mm)")
        return v


class ModelConfig(_Section):
    name: str = "dynunet"
    filters: list[int] = [16, 32, 64, 128]


class LossConfig(_Section):
    name: str = "dice_ce"
    cldice_alpha: float = Field(0.5, ge=0.0, le=1.0)
    cldice_iters: int = Field(3, ge=1)
    cbdice_weight: float = Field(1.0, ge=0.0)  # weight of the cbDice term in `cbdice_cldice`


class TrainConfig(_Section):
    epochs: int = Field(50, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    val_every: int = Field(1, ge=1)
    seed: int = Field(0, ge=0)
    selection_metric: str = "compound"
    # `last` is written (and uploaded) at the end of every N-th epoch and, if set, also mid-epoch
    # once this many minutes have passed since the previous one: a SIGKILL loses at most that.
    checkpoint_every_epochs: int = Field(1, ge=1)
    checkpoint_every_minutes: float | None = Field(None, gt=0)
    # train on every labelled pair (no validation split, so no best_* checkpoints): the model is
    # `last`, and its version is tagged so that `promote` never decides on it (nothing held out)
    production: bool = False


class InferenceConfig(_Section):
    roi_size: Auto | tuple[int, int, int] = "auto"
    overlap: float = Field(0.25, ge=0.0, lt=1.0)
    blend_mode: Literal["gaussian", "constant"] = "gaussian"
    sw_batch_size: int = Field(4, ge=1)
    normalization: Normalization = Normalization()


class ComputeConfig(_Section):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: Auto | int = "auto"
    patch_size: Auto | tuple[int, int, int] = "auto"
    cache_rate: Auto | float = "auto"
    amp: Auto | bool = "auto"
    # torch.compile the network for training (inductor, static shapes); see training/compute.py
    compile: Auto | bool = "auto"


class TrackingConfig(_Section):
    tracking_uri: str | None = None
    experiment: str = "clinbundle"
    model_name: str = "vessel-seg"
    # a remote server may be unreachable this long before training gives up; until then metrics,
    # tags and artifacts are spooled in the run folder and flushed, in order, when it returns
    outage_limit_s: float = Field(600.0, ge=0)
    # per-request timeout of MLflow's HTTP client (MLFLOW_HTTP_REQUEST_TIMEOUT) for remote servers
    http_timeout_s: int = Field(30, ge=1)
    # MLflow system metrics (CPU, memory, disk, network, GPU) sampled during training
    system_metrics: bool = True
    system_metrics_interval_s: float = Field(10.0, gt=0)


class Config(_Section):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    inference: InferenceConfig = InferenceConfig()
    compute: ComputeConfig = ComputeConfig()
    tracking: TrackingConfig = TrackingConfig()

    @field_validator("compute", mode="before")
    @classmethod
    def _compute_auto(cls, v: Any) -> Any:
        return {} if v == "auto" else v


def _default_dict() -> dict[str, Any]:
    text = resources.files("clinbundle").joinpath("configs/default.yaml").read_text()
    return yaml.safe_load(text)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_override(tree: dict[str, Any], item: str) -> None:
    """Apply one `section.key=value` override; the value is parsed as YAML (`[32,32,32]`, `1e-3`)."""
    if "=" not in item:
        raise ConfigError(f"--set needs key=value, got '{item}' (e.g. --set train.epochs=5)")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    node = tree
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(
                f"--set {key}: '{p}' is not a config section; see `clinbundle config`"
            )
        node = node[p]
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- `--set` overrides, validated; errors name the key and the fix."""
    tree = _default_dict()
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            user = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from None
        if not isinstance(user, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        tree = _merge(tree, user)
    for item in overrides or []:
        apply_override(tree, item)
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = [
            f"  {'.'.join(str(x) for x in err['loc'])}: {err['msg']} (got {err.get('input')!r})"
            for err in e.errors()
        ]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None


def config_to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
