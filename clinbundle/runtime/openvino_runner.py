"""OpenVINO on the CPU, reading the bundle's own `model.onnx` (no second graph to ship).

The batch axis stays dynamic and the spatial axes are fixed to the roi before compiling, so the
CPU plugin plans its convolutions for the one patch shape the sliding window sends.
Precision is always named: on CPUs with bf16 units the plugin's default is bf16, which flips
~2e-3 of labels; "f32" keeps fp32 parity, "bf16" is a separate candidate held to the Dice rule.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Literal

import numpy as np
import openvino as ov
import torch

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import DeviceError
from clinbundle.runtime.inference import Predictor
from clinbundle.runtime.runners import Runtime, local_runtime

log = logging.getLogger("clinbundle.runtime")

OvPrecision = Literal["f32", "bf16"]


def openvino_bf16_capable() -> bool:
    """Whether this CPU has bf16 units OpenVINO would use (else bf16 would only be emulated)."""
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def openvino_compiled(
    path: Path, contract: InferenceContract, precision: OvPrecision, threads: int, device: str
):
    """A CompiledModel of `path` for the CPU plugin at `precision` with `threads` threads."""
    if device == "cuda":
        raise DeviceError("OpenVINO runs on the CPU here; --device cuda needs an ORT CUDA runtime")
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape({model.input(0): ov.PartialShape([-1, contract.in_channels, *contract.roi_size])})
    config = {
        "INFERENCE_PRECISION_HINT": precision,
        "INFERENCE_NUM_THREADS": threads,
        "PERFORMANCE_HINT": "LATENCY",
    }
    compiled = core.compile_model(model, "CPU", config)
    got = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    log.info(
        "OpenVINO %s: CPU, precision %s (asked %s), %d threads", path.name, got, precision, threads
    )
    return compiled


def openvino_predictor(compiled) -> Predictor:
    """One infer request per call (a CompiledModel's own request is not thread-safe)."""
    lock = threading.Lock()

    def predict(patches: torch.Tensor) -> torch.Tensor:
        x = patches.detach().to("cpu", torch.float32).contiguous().numpy()
        with lock:
            request = compiled.create_infer_request()
        out = request.infer({0: x})[compiled.output(0)]
        return torch.from_numpy(np.array(out, dtype=np.float32, copy=True)).to(patches.device)

    return predict


def openvino_runtime(
    path: Path,
    contract: InferenceContract,
    precision: OvPrecision = "f32",
    threads: int = 1,
    device: str = "cpu",
) -> Runtime:
    compiled = openvino_compiled(path, contract, precision, threads, device)
    return local_runtime(
        openvino_predictor(compiled),
        contract,
        "cpu",
        f"openvino {ov.get_version().split('-')[0]} CPU {precision}, {threads} threads",
    )
