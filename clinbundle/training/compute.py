"""`compute: auto`: device, batch size, patch size, cache rate, AMP and compilation from
hardware and data.

Each choice is a `Decision` (value, whether it was automatic, and why) that is logged to the
console and to MLflow (`sys_*` params), and each can be overridden with `--set compute.X=...`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch

from clinbundle.runtime.errors import DeviceError
from clinbundle.training.config import ComputeConfig

log = logging.getLogger("clinbundle.compute")


@dataclass
class Decision:
    value: object
    auto: bool
    reason: str


@dataclass
class Compute:
    device: torch.device
    batch_size: int
    patch_size: tuple[int, int, int]
    cache_rate: float
    amp: bool
    compile: bool = False
    decisions: dict[str, Decision] = field(default_factory=dict)


def _available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):  # not on Linux: assume a modest machine
        return 8 << 30


def resolve_device(want: str) -> tuple[torch.device, str]:
    if want == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            "compute.device=cuda was asked for but torch sees no CUDA device "
            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
            "install a CUDA build of torch, check `nvidia-smi`, or use --set compute.device=cpu"
        )
    if want != "auto":
        return torch.device(want), "set by the user"
    if torch.cuda.is_available():
        return torch.device("cuda"), f"CUDA device found: {torch.cuda.get_device_name(0)}"
    return torch.device("cpu"), "no CUDA device found"


def resolve_compute(
    cfg: ComputeConfig, min_shape: tuple[int, int, int], total_voxels: int, divisor: int
) -> Compute:
    d: dict[str, Decision] = {}
    device, why = resolve_device(cfg.device)
    d["device"] = Decision(str(device), cfg.device == "auto", why)
    gpu_gib = (
        torch.cuda.get_device_properties(device).total_memory / 2**30
        if device.type == "cuda"
        else 0.0
    )

    if cfg.patch_size == "auto":
        target = 96 if gpu_gib >= 16 else 64
        patch = tuple(max(divisor, min(target, s) // divisor * divisor) for s in min_shape)
        d["patch_size"] = Decision(
            list(patch),
            True,
            f"{target}^3 for {device.type}, bounded by the smallest volume "
            f"{list(min_shape)} and rounded down to a multiple of {divisor}",
        )
    else:
        patch = tuple(cfg.patch_size)
        d["patch_size"] = Decision(list(patch), False, "set by the user")

    if cfg.batch_size == "auto":
        batch = 2 if device.type == "cpu" else (8 if gpu_gib >= 40 else 4 if gpu_gib >= 16 else 2)
        where = f"{gpu_gib:.0f} GiB GPU" if gpu_gib else "CPU"
        d["batch_size"] = Decision(batch, True, f"{where}")
    else:
        batch = int(cfg.batch_size)
        d["batch_size"] = Decision(batch, False, "set by the user")

    if cfg.cache_rate == "auto":
        need = total_voxels * 5  # float32 image + uint8 label
        avail = _available_memory_bytes()
        rate = 1.0 if need < 0.3 * avail else max(0.0, round(0.3 * avail / need, 2))
        d["cache_rate"] = Decision(
            rate, True, f"data needs {need / 2**20:.0f} MiB cached, {avail / 2**30:.1f} GiB free"
        )
    else:
        rate = float(cfg.cache_rate)
        d["cache_rate"] = Decision(rate, False, "set by the user")

    if cfg.amp == "auto":
        amp = device.type == "cuda"
        d["amp"] = Decision(amp, True, "mixed precision on CUDA only")
    else:
        amp = bool(cfg.amp) and device.type == "cuda"
        d["amp"] = Decision(amp, False, "set by the user (ignored on CPU)")

    d["compile"] = resolve_compile(cfg.compile)

    for k, dec in d.items():
        log.info(
            "compute.%s = %s (%s: %s)", k, dec.value, "auto" if dec.auto else "user", dec.reason
        )
    return Compute(device, batch, patch, rate, amp, bool(d["compile"].value), d)  # type: ignore[arg-type]


def resolve_compile(want: object) -> Decision:
    """Off unless asked for: on 2 CPU cores `torch.compile` of network and loss trains the
    default DynUNet 1.19x faster per epoch (48% -> 50% of sgemm) and the quickstart net 1.14x
    (benchmarks/train_throughput*.json), after seconds to a minute of compiling."""
    if want == "auto":
        return Decision(False, True, "eager: compiling costs more than it saves on short runs")
    return Decision(bool(want), False, "set by the user")
