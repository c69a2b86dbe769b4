"""The model a cohort runs: an ONNX bundle through its chosen runtime, or a registered MLflow
model in eager PyTorch, both through the one inference path (geometry included).

`ModelSpec` is plain data so that a worker process (a Ray actor) can receive it and open the
model itself, once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import ClinbundleError, DeviceError
from clinbundle.runtime.runners import VolumeRunner

log = logging.getLogger("clinbundle.cohort")


@dataclass(frozen=True)
class ModelSpec:
    model: str | None
    bundle: Path | None
    device: str = "auto"
    workdir: Path = Path("work")
    threads: int | None = None
    #: a bundle's shipped runtime by name (default: CLINBUNDLE_RUNTIME, else its measured one)
    runtime: str | None = None


@dataclass
class CohortModel:
    name: str
    version: str
    runtime: str  # "onnxruntime", "openvino", "pytorch", ...
    contract: InferenceContract
    run: VolumeRunner
    description: str = ""

    def probabilities(self, image: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """(1, 1, D, H, W) float32 on the grid `affine` describes -> (1, K, D, H, W)."""
        return self.run(image, affine, "probabilities")


def open_model(spec: ModelSpec) -> CohortModel:
    """Open what `spec` names; exactly one of model and bundle must be given."""
    if (spec.model is None) == (spec.bundle is None):
        raise ClinbundleError("give exactly one of --model URI and --bundle DIR")
    if spec.bundle is not None:
        return _open_bundle(spec)
    if spec.runtime not in (None, "pytorch"):
        raise ClinbundleError(
            f"--runtime {spec.runtime} needs a bundle: --model runs in PyTorch (eager); "
            "package the model (`clinbundle package onnx`) and give --bundle"
        )
    return _open_registered(spec)


def _open_bundle(spec: ModelSpec) -> CohortModel:
    from clinbundle.runtime.bundle_reader import load_bundle

    bundle = load_bundle(Path(spec.bundle), spec.device, spec.threads, runtime=spec.runtime)
    m = bundle.manifest.get("model", {})
    name, version = str(m.get("name") or bundle.path.name), str(m.get("version") or "")
    log.info("bundle %s (%s v%s) runs on %s", bundle.path, name, version, bundle.runtime_name)
    return CohortModel(
        name,
        version,
        bundle.runtime_name,
        bundle.contract,
        bundle.predict,
        bundle.runtime.description,
    )


def model_modality(spec: ModelSpec) -> str | None:
    """The contract's modality without opening a runtime: it picks each DICOM study's series
    when the cases are found, before any model is opened (on Ray, once per actor). A bundle's
    contract.json is read unverified here: opening the bundle checks it, and fails, later."""
    if spec.bundle is not None:
        from clinbundle.runtime.bundle_reader import CONTRACT_FILE

        try:
            text = (Path(spec.bundle) / CONTRACT_FILE).read_text()
            return InferenceContract.from_json(text).modality
        except (OSError, ValueError):
            return None  # opening the bundle says what is wrong with it
    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    from clinbundle.packaging.model_source import canonical_uri
    from clinbundle.tracking import configure_tracking

    configure_tracking(Path(spec.workdir).resolve())
    try:  # the MLmodel file only: the weights are downloaded once, where the model opens
        meta = get_model_info(canonical_uri(spec.model)).metadata or {}
    except MlflowException:
        return None  # opening the model says what is wrong with it
    contract = meta.get("inference_contract")
    return InferenceContract.model_validate(contract).modality if contract else None


def torch_device(device: str) -> str:
    """auto -> cuda when PyTorch sees a GPU, else cpu (logged); cuda without one fails."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        log.info("PyTorch device: auto -> %s", device)
    elif device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return device


def _open_registered(spec: ModelSpec) -> CohortModel:
    """A registered model in eager PyTorch, as the demo runs it (`apps.demo.pytorch_runtime`)."""
    import torch

    from clinbundle.packaging.model_source import resolve_model
    from clinbundle.packaging.runtimes import torch_runtime
    from clinbundle.tracking import configure_tracking

    workdir = Path(spec.workdir).resolve()
    configure_tracking(workdir)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    resolved = resolve_model(spec.model, workdir / "cache" / "models")
    runtime = torch_runtime(resolved.load_network(), resolved.contract, torch_device(spec.device))
    return CohortModel(
        str(resolved.name or resolved.uri),
        str(resolved.version or ""),
        "pytorch",
        resolved.contract,
        runtime.run,
        runtime.description,
    )
