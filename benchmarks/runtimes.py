"""Every runtime candidate against the machine, in one process, interleaved with sgemm.

For the default DynUNet ([16, 32, 64, 128], roi 64^3) and the quickstart DynUNet
([8, 16, 32, 64], roi 48^3), random weights (speed does not depend on them), a 128^3 volume,
the full sliding window of the one inference path: seconds, GFLOP/s, % of the same run's sgemm
and peak RSS of each runtime (eager PyTorch, ONNX Runtime, OpenVINO f32 and bf16, AOTInductor),
plus its max abs difference from eager, and the share the sliding-window layer (normalisation,
window gathering, Gaussian blending, softmax) adds to the predictor's own time. The machine may be shared: the JSON records the load
average, and % of sgemm (sgemm measured between runs) is the figure that means something.
The allocator setting the runtimes serve with (`clinbundle/runtime/allocator.py`) is applied
as in any serving process and recorded; `CLINBUNDLE_MALLOC=default` measures glibc's default.

    python benchmarks/runtimes.py --shape 128 128 128 --out benchmarks/runtimes.json
    CLINBUNDLE_MALLOC=default python benchmarks/runtimes.py --out benchmarks/runtimes_glibc_default.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clinbundle.packaging.measure import (
    TimedPredictor,
    patch_flops,
    sgemm_gflops,
    timed_with_peak_rss,
    windows,
)
from clinbundle.packaging.onnx_export import export_onnx
from clinbundle.packaging.runtime_candidates import CACHE_ENV, export_aoti
from clinbundle.packaging.runtimes import torch_runtime
from clinbundle.runtime.allocator import tune_allocator
from clinbundle.runtime.aoti_runner import aoti_runtime
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.inference import Predictor, segment
from clinbundle.runtime.networks import build_network, network_spec, spatial_divisor
from clinbundle.runtime.openvino_runner import openvino_bf16_capable, openvino_runtime
from clinbundle.runtime.runners import onnx_runtime, onnx_session

NETS = {"default": ([16, 32, 64, 128], 64), "quickstart": ([8, 16, 32, 64], 48)}


def contract_for(filters: list[int], roi: int) -> InferenceContract:
    spec = network_spec("dynunet", 1, 2, filters)
    return InferenceContract(
        network=spec,
        num_classes=2,
        labels={"0": "background", "1": "vessel"},
        roi_size=(roi, roi, roi),
        sw_batch_size=4,
        spatial_divisor=spatial_divisor(spec),
    )


def runtimes(net: torch.nn.Module, contract: InferenceContract, folder: Path, threads: int):
    onnx_path = export_onnx(net, contract, folder / "model.onnx")
    os.environ[CACHE_ENV] = str(folder / "cache")  # compile, not a cached package: time it
    t0 = time.perf_counter()
    build = export_aoti(net, contract, folder / "model.pt2")
    compile_s = time.perf_counter() - t0
    out = {
        "eager": torch_runtime(net, contract, "cpu"),
        "onnxruntime": onnx_runtime(onnx_session(onnx_path, "cpu", threads), contract),
        "openvino": openvino_runtime(onnx_path, contract, "f32", threads),
        "pytorch-aoti": aoti_runtime(folder / "model.pt2", contract, build, threads),
    }
    if openvino_bf16_capable():
        out["openvino-bf16"] = openvino_runtime(onnx_path, contract, "bf16", threads)
    return out, compile_s


def window_layer_pct(
    predictor: Predictor, volume: np.ndarray, contract: InferenceContract
) -> float:
    """What the one inference path adds to the predictor's own time, in % of the latter: one
    volume through `segment` (as `Runtime.run` does) with every predictor call timed."""
    timed = TimedPredictor(predictor)
    t0 = time.perf_counter()
    segment(timed, volume, contract)
    return 100 * (time.perf_counter() - t0 - timed.seconds) / timed.seconds


def bench_net(name: str, shape: tuple[int, ...], threads: int, rounds: int) -> dict:
    filters, roi = NETS[name]
    contract = contract_for(filters, roi)
    torch.manual_seed(0)
    net = build_network(contract.network).eval()
    volume = np.random.default_rng(0).normal(0, 1, (1, 1, *shape)).astype(np.float32)
    gflop = patch_flops(net, contract) * windows(shape, contract) / 1e9
    with tempfile.TemporaryDirectory() as tmp:
        rts, compile_s = runtimes(net, contract, Path(tmp), threads)
        ref = rts["eager"].run(volume, None)  # also the warm-up of eager
        diffs = {}
        for n, rt in rts.items():
            diffs[n] = float(np.abs(rt.run(volume, None) - ref).max())  # warm-up + parity
        best: dict[str, dict] = {}
        layer: dict[str, list[float]] = {n: [] for n in rts}
        sgemm = [sgemm_gflops()]
        for _ in range(rounds):
            for n, rt in rts.items():
                torch.set_num_threads(threads)
                seconds, peak = timed_with_peak_rss(lambda rt=rt: rt.run(volume, None))
                layer[n].append(window_layer_pct(rt.predictor, volume, contract))
                sgemm.append(sgemm_gflops())
                if n not in best or seconds < best[n]["seconds"]:
                    best[n] = {"seconds": round(seconds, 3), "peak_rss_mb": round(peak / 2**20)}
    rate = statistics.median(sgemm)
    for n, b in best.items():
        g = gflop / b["seconds"]
        b |= {"gflops": round(g, 1), "sgemm_pct": round(100 * g / rate, 1)}
        b["max_abs_vs_eager"] = diffs[n]
        b["window_layer_pct"] = round(statistics.median(layer[n]), 2)
        b["window_layer_pct_samples"] = [round(x, 2) for x in layer[n]]
    return {
        "filters": filters,
        "roi": [roi] * 3,
        "gflop_per_volume": round(gflop, 2),
        "sgemm_gflops_median": round(rate, 1),
        "sgemm_samples": [round(s, 1) for s in sgemm],
        "floor_s": round(gflop / rate, 2),
        "aoti_compile_s": round(compile_s, 1),
        "runtimes": best,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[128, 128, 128])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--nets", nargs="+", default=list(NETS), choices=list(NETS))
    ap.add_argument("--out", default="benchmarks/runtimes.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "threads": args.threads,
            "allocator": tune_allocator(),
            "load_average_before": os.getloadavg(),
            "note": "shared by other jobs while measured: compare % of sgemm, not seconds",
        },
        "shape": args.shape,
        "nets": {n: bench_net(n, tuple(args.shape), args.threads, args.rounds) for n in args.nets},
    }
    result["machine"]["load_average_after"] = os.getloadavg()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
