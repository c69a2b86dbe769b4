"""Runners behind the one sliding-window path: a `Predictor` (patches -> logits) wrapped into a
function from a raw volume to probabilities. ONNX Runtime lives here because every shipped format
runs it; eager PyTorch (the parity reference) and HTTP (a served bento) are in
`clinbundle.packaging.runtimes`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import DeviceError
from clinbundle.runtime.inference import Output, Predictor, segment

log = logging.getLogger("clinbundle.runtime")

#: Raw float32 volume (N, C, D, H, W) and its affine (None: on the contract's grid) ->
#: probabilities (N, K, D, H, W) on the input's grid, or labels (N, D, H, W) for formats that
#: only return masks (a MAP writing NIfTI / DICOM SEG).
VolumeRunner = Callable[[np.ndarray, np.ndarray | None], np.ndarray]

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


@dataclass
class Runtime:
    """A runner plus the words a report needs to say what actually ran."""

    run: VolumeRunner
    description: str
    #: The patch predictor behind `run` where one runs in this process (None over HTTP or for
    #: stored outputs), so a benchmark can time the sliding-window layer apart from the network.
    predictor: Predictor | None = None


def local_runtime(
    predictor: Predictor, contract: InferenceContract, device: str | torch.device, description: str
) -> Runtime:
    """A predictor of this process behind the one inference path."""
    return Runtime(volume_runner(predictor, contract, device), description, predictor)


def volume_runner(
    predictor: Predictor, contract: InferenceContract, device: str | torch.device = "cpu"
) -> VolumeRunner:
    def run(
        volume: np.ndarray, affine: np.ndarray | None = None, output: Output = "probabilities"
    ) -> np.ndarray:
        return segment(predictor, volume, contract, affine, output, device=device)

    return run


def select_providers(device: str = "auto") -> list[str]:
    """CUDA when asked for or (auto) when ONNX Runtime has it, else CPU; logged either way."""
    available = ort.get_available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise DeviceError(f"unknown device '{device}': use auto, cpu or cuda")
    if device == "cuda" and CUDA_EP not in available:
        raise DeviceError(
            "--device cuda was asked for, but this onnxruntime has no CUDAExecutionProvider "
            f"(available: {', '.join(available)}); install onnxruntime-gpu or use --device cpu"
        )
    use_cuda = device == "cuda" or (device == "auto" and CUDA_EP in available)
    providers = [CUDA_EP, CPU_EP] if use_cuda else [CPU_EP]
    log.info(
        "ONNX Runtime execution providers: %s (device=%s; available: %s)",
        providers,
        device,
        ", ".join(available),
    )
    return providers


def onnx_session(
    path: Path, device: str = "auto", threads: int | None = None
) -> ort.InferenceSession:
    """An ONNX Runtime session; a CUDA request that silently fell back to CPU is an error."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    providers = select_providers(device)
    session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    if device == "cuda" and session.get_providers()[0] != CUDA_EP:
        raise DeviceError(
            f"ONNX Runtime could not start CUDA for {path.name} (session providers: "
            f"{session.get_providers()}); check the CUDA/cuDNN libraries or use --device cpu"
        )
    log.info("ONNX Runtime session for %s runs on %s", path.name, session.get_providers()[0])
    return session


def onnx_predictor(session: ort.InferenceSession) -> Predictor:
    """Patches go to ONNX Runtime as float32 numpy; logits come back as a torch tensor."""
    name_in = session.get_inputs()[0].name
    name_out = session.get_outputs()[0].name

    def predict(patches: torch.Tensor) -> torch.Tensor:
        x = patches.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run([name_out], {name_in: x})[0]).to(patches.device)

    return predict


def onnx_runtime(session: ort.InferenceSession, contract: InferenceContract) -> Runtime:
    provider = session.get_providers()[0]
    return local_runtime(
        onnx_predictor(session), contract, "cpu", f"onnxruntime {ort.__version__} {provider}"
    )
