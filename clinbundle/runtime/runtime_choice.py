"""Which runtime a bundle runs: the one its packaging measured fastest among those that passed
parity (manifest `runtimes`), unless CLINBUNDLE_RUNTIME (or the caller: app.yaml for the MAP)
names another. Every choice is logged with its reason; a runtime that failed parity is refused
with the numbers it failed by.

Candidates (each a Predictor behind the one sliding-window path):
    onnxruntime     model.onnx, ONNX Runtime (CPU, or CUDA where onnxruntime-gpu sees a GPU)
    openvino        model.onnx, OpenVINO CPU plugin, fp32 inference precision
    openvino-bf16   model.onnx, OpenVINO bf16 (CPUs with bf16 units only; Dice rule)
    pytorch-aoti    runtimes/model.pt2, AOTInductor package (CPU ISA + torch version checked)

The sliding-window batch is the one packaging measured fastest for the default runtime
(manifest `runtimes.sw_batch`), the contract's for any other, CLINBUNDLE_SW_BATCH_SIZE over both.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from clinbundle.runtime.allocator import tune_allocator
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import BundleError, ParityError
from clinbundle.runtime.runners import CUDA_EP, Runtime, onnx_runtime, onnx_session
from clinbundle.runtime.threads import resolve_threads

log = logging.getLogger("clinbundle.runtime")

RUNTIME_ENV = "CLINBUNDLE_RUNTIME"
SW_BATCH_ENV = "CLINBUNDLE_SW_BATCH_SIZE"
ORT, OPENVINO, OPENVINO_BF16, AOTI = "onnxruntime", "openvino", "openvino-bf16", "pytorch-aoti"
RUNTIME_NAMES = (ORT, OPENVINO, OPENVINO_BF16, AOTI)
AOTI_FILE = "runtimes/model.pt2"


@dataclass
class Chosen:
    """The runtime that runs, and why (what /metadata and the MAP log say)."""

    name: str
    reason: str
    runtime: Runtime
    sw_batch_size: int


def runtime_table(manifest: dict) -> dict:
    """The manifest's `runtimes` section; a bundle from before it ships ONNX Runtime only."""
    return manifest.get("runtimes") or {
        "default": ORT,
        "candidates": {ORT: {"passed": True, "file": "model.onnx"}},
    }


def refuse_failed(name: str, entry: dict) -> None:
    if not entry.get("passed"):
        p = entry.get("parity", {})
        raise ParityError(
            f"runtime '{name}' failed parity at packaging ({p.get('summary', 'no report')}; "
            f"tolerances {entry.get('tolerances')}): it cannot be used. Pick a passing one: "
            f"unset {RUNTIME_ENV} or see the manifest's runtimes table"
        )


def open_named(
    name: str,
    folder: Path,
    table: dict,
    contract: InferenceContract,
    device: str,
    threads: int,
) -> Runtime:
    """Open one shipped runtime (its parity already checked to have passed)."""
    tune_allocator()
    entry = table["candidates"][name]
    if name == ORT:
        return onnx_runtime(onnx_session(folder / "model.onnx", device, threads), contract)
    if name in (OPENVINO, OPENVINO_BF16):
        try:
            from clinbundle.runtime.openvino_runner import openvino_runtime
        except ImportError as e:  # an environment without openvino: the next runtime runs
            from clinbundle.runtime.aoti_runner import RuntimeMismatch

            raise RuntimeMismatch(f"openvino is not installed here ({e})") from None

        precision = "bf16" if name == OPENVINO_BF16 else "f32"
        return openvino_runtime(folder / "model.onnx", contract, precision, threads, device)
    if name == AOTI:
        from clinbundle.runtime.aoti_runner import aoti_runtime

        return aoti_runtime(folder / entry["file"], contract, entry["build"], threads, device)
    raise BundleError(f"unknown runtime '{name}' (known: {', '.join(RUNTIME_NAMES)})")


def requested_runtime(requested: str | None) -> str | None:
    value = requested if requested is not None else os.environ.get(RUNTIME_ENV, "")
    value = value.strip()
    return None if value in ("", "auto", "default") else value


def fallback_order(table: dict) -> list[str]:
    """The default first, then the other passers at the default's precision, fastest first."""
    cands = table["candidates"]
    default = table["default"]
    precision = cands[default].get("precision", "fp32")
    others = [
        n
        for n, e in cands.items()
        if n != default and e.get("passed") and e.get("precision", "fp32") == precision
    ]
    others.sort(key=lambda n: cands[n].get("seconds") or float("inf"))
    return [default, *others]


def cuda_wanted(device: str) -> bool:
    if device == "cpu":
        return False
    import onnxruntime as ort

    return device == "cuda" or CUDA_EP in ort.get_available_providers()


def choose_runtime(
    folder: Path,
    manifest: dict,
    contract: InferenceContract,
    device: str = "auto",
    threads: int | None = None,
    requested: str | None = None,
) -> Chosen:
    """Open the runtime this bundle should run here; see the module docstring."""
    from clinbundle.runtime.aoti_runner import RuntimeMismatch

    table = runtime_table(manifest)
    threads = resolve_threads(threads)
    forced = requested_runtime(requested)
    if forced is not None:
        if forced not in table["candidates"]:
            raise BundleError(
                f"runtime '{forced}' is not in this bundle (it ships: "
                f"{', '.join(table['candidates'])}); check {RUNTIME_ENV}"
            )
        refuse_failed(forced, table["candidates"][forced])
        why = f"forced by {RUNTIME_ENV if requested is None else 'the caller'}"
        return _opened(forced, why, folder, table, contract, device, threads)
    if cuda_wanted(device):
        return _opened(
            ORT,
            f"CUDA (device={device}): ONNX Runtime's CUDA EP",
            folder,
            table,
            contract,
            device,
            threads,
        )
    measured = table["candidates"][table["default"]]
    why = "the bundle's default: fastest parity-passing runtime measured at packaging"
    if measured.get("seconds") is not None:
        why += f" ({measured['seconds']:.2f} s, {measured.get('sgemm_pct', 0):.0f}% of sgemm)"
    for name in fallback_order(table):
        try:
            return _opened(name, why, folder, table, contract, device, threads)
        except RuntimeMismatch as e:
            log.warning(
                "runtime %s cannot run here (%s); falling back to the next fastest", name, e
            )
            why = f"fallback: {name} refused ({e})"
    raise BundleError(f"{folder}: none of its parity-passing runtimes can run on this machine")


def sw_batch_for(name: str, table: dict, contract: InferenceContract) -> tuple[int, str]:
    """The sliding-window batch `name` runs with here, and why."""
    raw = os.environ.get(SW_BATCH_ENV, "").strip()
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{SW_BATCH_ENV}={raw!r}: give a positive whole number")
        return int(raw), f"{SW_BATCH_ENV}"
    measured = table.get("sw_batch") or {}
    if measured.get("runtime") == name:
        return int(measured["chosen"]), "the fastest measured at packaging"
    return contract.sw_batch_size, "the contract's"


def _opened(name, why, folder, table, contract, device, threads) -> Chosen:
    batch, batch_why = sw_batch_for(name, table, contract)
    if batch != contract.sw_batch_size:
        contract = contract.model_copy(update={"sw_batch_size": batch})
    runtime = open_named(name, folder, table, contract, device, threads)
    runtime.description = f"{name}: {runtime.description}, window batch {batch}"
    log.info(
        "runtime %s (%s): %s; sliding-window batch %d (%s)",
        *(name, why, runtime.description, batch, batch_why),
    )
    return Chosen(name, why, runtime, batch)
