"""Packaging-time choice of the runtime a bundle runs by default, by measurement.

    candidates (ORT, OpenVINO f32, OpenVINO bf16 where the CPU has bf16 units, AOTInductor)
    -> each runs the parity suite against the packaging run's PyTorch reference
    -> passers are timed end to end on a representative volume, interleaved with sgemm
    -> table in the manifest (seconds, GFLOP/s, % of sgemm, peak RSS, parity) + default

The default is the fastest passer at the bundle's own precision; a bf16 candidate is shipped
(selectable with CLINBUNDLE_RUNTIME) when it passes its Dice rule, never made the default of an
fp32 bundle; a bf16 bundle's default is the fastest of the fp32 and bf16 passers. A candidate
that fails is recorded with its numbers and cannot be selected.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from clinbundle.packaging.measure import patch_flops, sgemm_gflops, timed_with_peak_rss, windows
from clinbundle.packaging.parity import ParityReport, Reference, Tolerances, check_parity
from clinbundle.runtime.allocator import tune_allocator
from clinbundle.runtime.aoti_runner import build_info
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.runners import Runtime
from clinbundle.runtime.runtime_choice import (
    AOTI,
    AOTI_FILE,
    OPENVINO,
    OPENVINO_BF16,
    ORT,
    SW_BATCH_ENV,
)

log = logging.getLogger("clinbundle.runtimes")

#: bf16 changes ~1e-2 of a probability: it is held to the Dice rule, as fp16 bundles are.
BF16_TOLERANCES = Tolerances.for_precision("bf16")
TIMING_ROUNDS = 2
#: A candidate (or window batch) over this multiple of the fastest after its first timed run
#: is not timed again: a second run cannot make it the fastest, and each costs seconds.
PRUNE_RATIO = 1.25
#: Sliding-window batches tried for the default runtime (and the contract's own).
SW_BATCH_CHOICES = (1, 2, 4, 8)
CACHE_ENV = "CLINBUNDLE_CACHE_DIR"
#: Inductor settings of the AOTInductor compile. Freezing folds the weights into the package as
#: constants (they are fixed at packaging anyway) and lets the CPU backend pre-pack them for
#: oneDNN: on the quickstart DynUNet (2 cores) the compile took 12.5 s instead of 19 s; random
#: windows ran at 22-25 ms against 31 ms, a whole CT's windows at ~24 ms either way.
AOTI_INDUCTOR_CONFIGS = {"freezing": True}


@dataclass
class Candidate:
    name: str
    precision: str
    tolerances: Tolerances
    runtime: Runtime | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)
    report: ParityReport | None = None
    open: Callable[..., Runtime] | None = None  # (contract, threads=) -> the runtime, reopened


def aoti_cache_path(network: torch.nn.Module, contract: InferenceContract) -> Path:
    """Compiling costs tens of seconds on 2 cores; the same weights, graph, torch, CPU and
    Inductor settings give the same package, so it is kept under a key of all five
    (CLINBUNDLE_CACHE_DIR)."""
    h = hashlib.sha256()
    buf = io.BytesIO()
    torch.save(network.state_dict(), buf)
    h.update(buf.getvalue())
    h.update(json.dumps([contract.network.model_dump(), list(contract.roi_size)]).encode())
    h.update(json.dumps(build_info(), sort_keys=True).encode())
    h.update(json.dumps(AOTI_INDUCTOR_CONFIGS, sort_keys=True).encode())
    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "clinbundle")
    return root / "aoti" / f"{h.hexdigest()[:32]}.pt2"


def export_aoti(network: torch.nn.Module, contract: InferenceContract, dest: Path) -> dict:
    """torch.export (dynamic batch, the roi's spatial shape) -> AOTInductor package at `dest`."""
    network = network.to("cpu").float().eval()
    cached = aoti_cache_path(network, contract)
    if not cached.is_file():
        example = torch.randn(2, contract.in_channels, *contract.roi_size)
        batch = torch.export.Dim("batch", min=1, max=1024)
        log.info("compiling the AOTInductor package (cached at %s)", cached)
        with torch.inference_mode():
            program = torch.export.export(network, (example,), dynamic_shapes=({0: batch},))
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".tmp{os.getpid()}.pt2")
        torch._inductor.aoti_compile_and_package(
            program, package_path=str(tmp), inductor_configs=dict(AOTI_INDUCTOR_CONFIGS)
        )
        tmp.replace(cached)
    else:
        log.info("AOTInductor package from the cache: %s", cached)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(cached.read_bytes())
    return build_info()


def open_candidates(
    folder: Path,
    network: torch.nn.Module,
    contract: InferenceContract,
    tolerances: Tolerances,
    threads: int,
    bf16_tolerances: Tolerances = BF16_TOLERANCES,
) -> list[Candidate]:
    """Every runtime this machine can offer for the staged bundle in `folder`; a candidate that
    cannot be built is kept with its error (the table says why it is missing)."""
    from clinbundle.runtime.runtime_choice import open_named

    aoti_path = folder / AOTI_FILE
    cands = [
        Candidate(ORT, "fp32", tolerances),
        Candidate(OPENVINO, "fp32", tolerances),
        Candidate(AOTI, "fp32", tolerances, extra={"file": AOTI_FILE}),
    ]
    try:
        from clinbundle.runtime.openvino_runner import openvino_bf16_capable

        if openvino_bf16_capable():
            cands.insert(2, Candidate(OPENVINO_BF16, "bf16", bf16_tolerances))
        else:
            log.info("openvino-bf16 not offered: this CPU has no bf16 units")
    except ImportError:
        pass
    for c in cands:
        try:
            if c.name == AOTI:
                c.extra["build"] = export_aoti(network, contract, aoti_path)
            table = {"candidates": {c.name: c.extra}}
            c.open = functools.partial(open_named, c.name, folder, table, device="cpu")
            c.runtime = c.open(contract, threads=threads)
        except Exception as e:  # a missing compiler or library: recorded, not fatal
            log.warning("runtime candidate %s unavailable: %s", c.name, e)
            c.error = f"{type(e).__name__}: {e}"[:500]
            if c.name == AOTI and aoti_path.exists():
                aoti_path.unlink()
    return cands


def representative_volume(contract: InferenceContract, shape: tuple[int, ...] | None) -> np.ndarray:
    """Synthetic vessels on the contract's grid; default twice the roi per axis."""
    from clinbundle.training.synth import synthesize_volume

    shape = tuple(shape or (2 * r for r in contract.roi_size))
    image = synthesize_volume(tuple(max(s, 16) for s in shape), np.random.default_rng(7))[0]
    image = image[: shape[0], : shape[1], : shape[2]]
    return np.ascontiguousarray(image[None, None], dtype=np.float32)


def time_passers(
    cands: list[Candidate], volume: np.ndarray, threads: int
) -> tuple[dict[str, dict], list[float]]:
    """Warm each passer up, then time rounds interleaved with sgemm; each keeps its best run.
    A candidate over PRUNE_RATIO x the fastest after a round sits out the later rounds."""
    torch.set_num_threads(threads)
    passers = [c for c in cands if c.report is not None and c.report.passed]
    for c in passers:
        c.runtime.run(volume, None)
    best: dict[str, dict] = {}
    sgemm = [sgemm_gflops()]
    for _ in range(TIMING_ROUNDS):
        fastest = min((b["seconds"] for b in best.values()), default=float("inf"))
        for c in passers:
            if c.name in best and best[c.name]["seconds"] > PRUNE_RATIO * fastest:
                continue
            seconds, peak = timed_with_peak_rss(lambda c=c: c.runtime.run(volume, None))
            sgemm.append(sgemm_gflops())
            torch.set_num_threads(threads)  # a runtime may have changed it
            runs = best.get(c.name, {}).get("runs", 0) + 1
            if c.name not in best or seconds < best[c.name]["seconds"]:
                best[c.name] = {"seconds": seconds, "peak_rss_mb": round(peak / 2**20, 1)}
            best[c.name]["runs"] = runs
    return best, sgemm


def measure_sw_batch(
    c: Candidate,
    contract: InferenceContract,
    volume: np.ndarray,
    threads: int,
    contract_seconds: float | None = None,
) -> dict:
    """The default runtime timed at each sliding-window batch on the representative volume.

    Measured, not assumed: a larger batch feeds wider GEMMs but holds more activations, and
    where that pays depends on the runtime, the network and the cores. A batch whose output
    differs from the contract batch's (which passed parity) by more than the runtime's
    tolerance is not chosen. `contract_seconds`: the contract batch's time from
    `time_passers` (not timed again); a batch over PRUNE_RATIO x the fastest after one run
    is not run again.
    """
    base = c.runtime.run(volume, None)
    limit = c.tolerances.max_abs
    seconds, diffs = {}, {}
    if contract_seconds is not None:
        seconds[contract.sw_batch_size], diffs[contract.sw_batch_size] = contract_seconds, 0.0
    for batch in sorted({*SW_BATCH_CHOICES, contract.sw_batch_size} - set(seconds)):
        runtime = c.runtime
        if batch != contract.sw_batch_size:
            runtime = c.open(contract.model_copy(update={"sw_batch_size": batch}), threads=threads)
        diffs[batch] = float(np.abs(runtime.run(volume, None) - base).max())  # also warms up
        runs = []
        for _ in range(TIMING_ROUNDS):
            if runs and runs[0] > PRUNE_RATIO * min(seconds.values(), default=float("inf")):
                break
            torch.set_num_threads(threads)
            runs.append(timed_with_peak_rss(lambda r=runtime: r.run(volume, None))[0])
        seconds[batch] = min(runs)
    allowed = [b for b in seconds if limit is None or diffs[b] <= limit]
    chosen = min(allowed, key=seconds.get)
    log.info(
        "sliding-window batch for %s: %d (%s)",
        c.name,
        chosen,
        ", ".join(f"{b}: {s:.2f} s" for b, s in sorted(seconds.items())),
    )
    return {
        "runtime": c.name,
        "chosen": chosen,
        "contract": contract.sw_batch_size,
        "chosen_by": "fastest on the representative volume, output within the runtime's "
        f"tolerance of the contract batch's ({SW_BATCH_ENV} overrides at load)",
        "seconds": {str(b): round(s, 3) for b, s in sorted(seconds.items())},
        "max_abs_vs_contract_batch": {str(b): d for b, d in sorted(diffs.items())},
    }


def parity_entry(c: Candidate) -> dict:
    entry = {"precision": c.precision, "tolerances": asdict(c.tolerances), **c.extra}
    if c.runtime is not None:
        entry["description"] = c.runtime.description
    if c.error is not None:
        return entry | {"passed": False, "error": c.error}
    o = c.report.overall()
    parity = {k: o[k] for k in ("max_abs", "p999_abs", "flip_fraction", "min_dice")}
    return entry | {"passed": c.report.passed, "parity": {"summary": c.report.summary(), **parity}}


def measure_candidates(
    cands: list[Candidate],
    reference: Reference,
    contract: InferenceContract,
    network: torch.nn.Module,
    threads: int,
    precision: str = "fp32",
    bench_shape: tuple[int, ...] | None = None,
    report_folder: Path | None = None,
    known: dict[str, ParityReport] | None = None,
) -> dict:
    """Parity for each candidate, timing for the passers: the manifest's `runtimes` section.

    `known`: reports already made of a candidate with the same file, reference and tolerances
    (the ONNX gate's ORT run on the CPU), reused instead of running the parity suite again."""
    for c in cands:
        if c.runtime is None:
            continue
        reuse = (known or {}).get(c.name)
        if reuse is not None and reuse.tolerances == c.tolerances:
            log.info("%s: the parity report of the ONNX gate (same file and provider)", c.name)
            c.report = reuse
        else:
            c.report = check_parity(
                reference, c.runtime, reference.cases, contract, c.tolerances, c.name
            )
        if report_folder is not None:
            c.report.write(report_folder / c.name)
    volume = representative_volume(contract, bench_shape)
    gflop = patch_flops(network, contract) * windows(volume.shape[2:], contract) / 1e9
    timings, sgemm = time_passers(cands, volume, threads)
    rate = statistics.median(sgemm)
    table = {name: parity_entry(c) for c in cands for name in [c.name]}
    for name, t in timings.items():
        gflops = gflop / t["seconds"]
        table[name] |= t | {"gflops": round(gflops, 2), "sgemm_pct": round(100 * gflops / rate, 1)}
    # a bf16 bundle lets the Dice rule's candidate win; an exact one still may, if faster
    allowed = {"fp32", "bf16"} if precision == "bf16" else {precision}
    eligible = [n for n in timings if table[n]["precision"] in allowed]
    if not eligible:
        raise RuntimeError("no runtime candidate passed parity at the bundle's precision")
    default = min(eligible, key=lambda n: table[n]["seconds"])
    log.info(
        "runtimes: %s; default %s",
        ", ".join(f"{n} {t['seconds']:.2f} s" for n, t in timings.items()),
        default,
    )
    chosen = next(c for c in cands if c.name == default)
    return {
        "default": default,
        "sw_batch": measure_sw_batch(
            chosen, contract, volume, threads, timings[default]["seconds"]
        ),
        "chosen_by": f"fastest parity-passing {' or '.join(sorted(allowed))} candidate, "
        "timed end to end",
        "volume_shape": list(volume.shape),
        "gflop_per_volume": round(gflop, 3),
        "sgemm_gflops": round(rate, 2),
        "sgemm_samples": [round(s, 2) for s in sgemm],
        "threads": threads,
        "allocator": tune_allocator(),
        "timing_rounds": TIMING_ROUNDS,
        "packaging_machine": build_info(),
        "note": "timed on the packaging machine, which may be shared; % of the same run's "
        "sgemm is the figure that travels",
        "candidates": table,
    }
