"""Runtimes behind the shared sliding-window path: each is a `Predictor` (patches -> logits).

A format never re-implements windowing, blending, normalisation or softmax: it only supplies a
Predictor, and `volume_runner` wraps it in `clinbundle.inference.sliding_window_probabilities`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from clinbundle.contract import InferenceContract
from clinbundle.errors import DeviceError
from clinbundle.inference import Predictor, sliding_window_probabilities, torch_predictor

log = logging.getLogger("clinbundle.runtime")

#: Raw float32 volume (N, C, D, H, W) -> probabilities (N, K, D, H, W), or labels (N, D, H, W)
#: for formats that only return masks (a MAP writing NIfTI / DICOM SEG).
VolumeRunner = Callable[[np.ndarray], np.ndarray]

CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"


@dataclass
class Runtime:
    """A runner plus the words a report needs to say what actually ran."""

    run: VolumeRunner
    description: str


def volume_runner(
    predictor: Predictor, contract: InferenceContract, device: str | torch.device = "cpu"
) -> VolumeRunner:
    def run(volume: np.ndarray) -> np.ndarray:
        return sliding_window_probabilities(predictor, volume, contract, device=device)

    return run


def torch_runtime(network: torch.nn.Module, contract: InferenceContract, device: str = "cpu"):
    """Eager PyTorch: the reference of every parity check (fp32; no autocast)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for, but PyTorch sees no CUDA device")
    network = network.to(device).eval()
    return Runtime(
        volume_runner(torch_predictor(network), contract, device),
        f"pytorch {torch.__version__} eager fp32 on {device}",
    )


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
    return Runtime(
        volume_runner(onnx_predictor(session), contract, "cpu"),
        f"onnxruntime {ort.__version__} {provider}",
    )


def http_runtime(
    url: str, contract: InferenceContract, token: str | None = None, timeout: float = 600
) -> Runtime:
    """A running clinbundle service as a runner: volumes go up as .npy, probabilities come back.

    The service runs the shared sliding-window path itself; this runner only moves bytes, so a
    difference from the ONNX bundle can only come from the server side.
    """
    import io

    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    endpoint = url.rstrip("/") + "/segment_array"

    def run(volume: np.ndarray) -> np.ndarray:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(volume, dtype=np.float32), allow_pickle=False)
        r = httpx.post(
            endpoint,
            files={"array": ("volume.npy", buf.getvalue(), "application/octet-stream")},
            data={"probabilities": "true"},
            headers=headers,
            timeout=timeout,
        )
        if r.status_code != 200:
            raise RuntimeError(f"{endpoint} answered {r.status_code}: {r.text[:500]}")
        return np.load(io.BytesIO(r.content), allow_pickle=False)

    return Runtime(run, f"HTTP {url} (clinbundle service, ONNX Runtime server side)")
