"""Full-volume sliding-window throughput: eager PyTorch vs ONNX Runtime, same process, same volumes.

For the default DynUNet and for SegResNet (random weights: speed does not depend on them) it
runs the shared path (`clinbundle.runtime.inference.sliding_window_probabilities`) with each runtime and
reports, as JSON: voxels/s of each, the ORT/PyTorch speed-up, achieved GFLOP/s (network FLOPs
counted by torch's FlopCounterMode x windows evaluated) next to this machine's own sgemm
GFLOP/s, and the peak RSS of each runtime measured in a child process of its own.

    python benchmarks/onnx_vs_torch.py --shape 96 96 96 --roi 64 64 64 --out onnx_vs_torch.json

Goal (issue 4): ORT >= 3x eager PyTorch for the default DynUNet on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from hardware import sgemm_gflops
from torch.utils.flop_counter import FlopCounterMode

from clinbundle.packaging.onnx_export import export_onnx
from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.inference import sliding_window_probabilities, torch_predictor
from clinbundle.runtime.networks import build_network, network_spec, spatial_divisor
from clinbundle.runtime.runners import onnx_predictor, onnx_session

FAMILIES = {"dynunet": [16, 32, 64, 128], "segresnet": [16, 32, 64, 128]}


def contract_for(family: str, roi: tuple[int, int, int], sw_batch: int) -> InferenceContract:
    spec = network_spec(family, 1, 2, FAMILIES[family])
    return InferenceContract(
        network=spec,
        num_classes=2,
        labels={"0": "background", "1": "vessel"},
        roi_size=roi,
        sw_batch_size=sw_batch,
        spatial_divisor=spatial_divisor(spec),
    )


def counting(predictor):
    """Wrap a predictor to count the patches it is given (= windows evaluated)."""
    seen = {"patches": 0}

    def run(x: torch.Tensor) -> torch.Tensor:
        seen["patches"] += x.shape[0]
        return predictor(x)

    return run, seen


def time_runtime(
    predictor, volume, contract, repeats: int, device: str = "cpu"
) -> tuple[float, int]:
    counted, seen = counting(predictor)
    sliding_window_probabilities(counted, volume, contract, device)  # warm-up (plans, allocator)
    seen["patches"] = 0
    t0 = time.perf_counter()
    for _ in range(repeats):
        sliding_window_probabilities(counted, volume, contract, device)  # returns numpy: synced
    return (time.perf_counter() - t0) / repeats, seen["patches"] // repeats


def _vm_hwm_kib() -> int:
    """Peak RSS of this process (VmHWM). ru_maxrss would not do: Linux carries it across exec,
    so a spawned child would report its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _peak_rss_child(kind: str, family: str, roi, sw_batch, shape, onnx_path, threads, q) -> None:
    torch.set_num_threads(threads)
    contract = contract_for(family, roi, sw_batch)
    torch.manual_seed(0)
    volume = np.random.default_rng(0).normal(100, 40, (1, 1, *shape)).astype(np.float32)
    if kind == "torch":
        pred = torch_predictor(build_network(contract.network).eval())
    else:
        pred = onnx_predictor(onnx_session(Path(onnx_path), "cpu", threads))
    base = _vm_hwm_kib()
    sliding_window_probabilities(pred, volume, contract)
    q.put((base, _vm_hwm_kib()))


def peak_rss_mib(kind, family, roi, sw_batch, shape, onnx_path, threads) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(
        target=_peak_rss_child,
        args=(kind, family, roi, sw_batch, shape, onnx_path, threads, q),
    )
    p.start()
    base, peak = q.get(timeout=600)
    p.join()
    return {"peak_rss_mib": round(peak / 1024, 1), "after_load_rss_mib": round(base / 1024, 1)}


def bench_family(family: str, args, sgemm: float, tmp: Path) -> dict:
    contract = contract_for(family, tuple(args.roi), args.sw_batch)
    torch.manual_seed(0)
    net = build_network(contract.network).eval()
    x = torch.zeros(1, 1, *contract.roi_size)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x)
    flops_per_patch = fc.get_total_flops()
    onnx_path = tmp / f"{family}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(net, contract, onnx_path)
    volume = np.random.default_rng(0).normal(100, 40, (1, 1, *args.shape)).astype(np.float32)
    session = onnx_session(onnx_path, "cpu", args.threads)
    t_torch, patches = time_runtime(torch_predictor(net), volume, contract, args.repeats)
    t_ort, _ = time_runtime(onnx_predictor(session), volume, contract, args.repeats)
    voxels = int(np.prod(args.shape))
    gflop = flops_per_patch * patches / 1e9

    def side(t: float) -> dict:
        return {
            "seconds_per_volume": round(t, 3),
            "voxels_per_s": round(voxels / t),
            "gflops": round(gflop / t, 1),
            "fraction_of_sgemm": round(gflop / t / sgemm, 3),
        }

    compiled = None
    if args.compile:  # inductor on CPU: the upper bound eager PyTorch is measured against
        t_comp, _ = time_runtime(
            torch_predictor(torch.compile(net)), volume, contract, args.repeats
        )
        compiled = side(t_comp) | {"speedup_over_eager": round(t_torch / t_comp, 2)}
    result = {
        "family": family,
        "filters": FAMILIES[family],
        "windows_per_volume": patches,
        "gflop_per_volume": round(gflop, 2),
        "pytorch_eager": side(t_torch),
        "onnxruntime_cpu": side(t_ort),
        "speedup_ort_over_eager": round(t_torch / t_ort, 2),
    }
    if compiled:
        result["pytorch_compiled"] = compiled
    if not args.no_memory:
        for kind, key in (("torch", "pytorch_eager"), ("ort", "onnxruntime_cpu")):
            result[key] |= peak_rss_mib(
                kind,
                family,
                tuple(args.roi),
                args.sw_batch,
                tuple(args.shape),
                onnx_path,
                args.threads,
            )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--roi", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--sw-batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--families", nargs="+", default=list(FAMILIES))
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (slow start)")
    ap.add_argument("--no-memory", action="store_true", help="skip the child-process RSS runs")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sgemm = sgemm_gflops()
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_family(f, args, sgemm, Path(tmp)) for f in args.families]
    report = {
        "benchmark": "onnx_vs_torch",
        "volume_shape": args.shape,
        "roi": args.roi,
        "sw_batch_size": args.sw_batch,
        "threads": args.threads,
        "sgemm_gflops": round(sgemm, 1),
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "python": platform.python_version(),
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "results": results,
        "goal": "onnxruntime >= 3x eager for dynunet",
        "goal_met": next(r for r in results if r["family"] == "dynunet")["speedup_ort_over_eager"]
        >= 3
        if "dynunet" in args.families
        else None,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
