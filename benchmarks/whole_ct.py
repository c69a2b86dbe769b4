"""A whole clinical CT through an ONNX bundle: time, achieved GFLOP/s beside the same run's
sgemm, and the peak RSS of the process, as JSON.

The volume is what a scanner sends (512 x 512 x 300 int16 at 0.7 x 0.7 x 1.5 mm, stored LPS);
it goes through the bundle exactly as the bento and the MAP run it: the one inference path
reorients and resamples it to the contract's grid, slides the window, and maps labels back to
the input grid, with the bundle's default runtime (its measured fastest; CLINBUNDLE_RUNTIME
overrides) and sliding-window batch. It runs in a child process of its own, so its VmHWM is
this volume's peak and not the parent's. The time is split three ways: the predictor (the
network), the sliding-window layer around it (normalisation, window gathering, blending,
softmax) and the geometry (resampling to the model grid and back, labels), by timing the one
`sliding_window_probabilities` call and the predictor inside it.

    python benchmarks/whole_ct.py --bundle bundles/onnx --out benchmarks/whole_ct.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import time
from pathlib import Path

import numpy as np
import torch
from hardware import sgemm_gflops

from clinbundle.training.synth import synthetic_ct


def _vm_hwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _instrument_sliding_window(spent: dict[str, float]) -> None:
    """Wrap the one sliding-window function so each call adds its own and its predictor's
    seconds to `spent` (the bundle's runtime calls it through the module, as every format does)."""
    from clinbundle.packaging.measure import TimedPredictor
    from clinbundle.runtime import inference

    original = inference.sliding_window_probabilities

    def timed(predictor, *args, **kwargs):
        inner = TimedPredictor(predictor)
        t0 = time.perf_counter()
        out = original(inner, *args, **kwargs)
        spent["sliding_window"] += time.perf_counter() - t0
        spent["predictor"] += inner.seconds
        return out

    inference.sliding_window_probabilities = timed


def _child(bundle_dir: str, shape, spacing, threads: int, q) -> None:
    from clinbundle.packaging.measure import windows
    from clinbundle.runtime.bundle_reader import load_bundle
    from clinbundle.runtime.geometry import plan

    torch.set_num_threads(threads)
    bundle = load_bundle(Path(bundle_dir), "cpu", threads)
    c = bundle.contract
    affine = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])  # LPS, as DICOM stores it
    volume = synthetic_ct(shape)
    grid = plan(shape, affine, c.geometry.spacing, c.geometry.orientation).model
    spent = {"sliding_window": 0.0, "predictor": 0.0}
    _instrument_sliding_window(spent)
    t0 = time.perf_counter()
    labels = bundle.predict(volume.astype(np.float32)[None, None], affine, "labels")
    seconds = time.perf_counter() - t0
    layer = spent["sliding_window"] - spent["predictor"]
    q.put(
        {
            "seconds": seconds,
            "seconds_split": {
                "predictor": round(spent["predictor"], 2),
                "sliding_window_layer": round(layer, 2),
                "geometry_and_labels": round(seconds - spent["sliding_window"], 2),
            },
            "sliding_window_layer_pct_of_predictor": round(100 * layer / spent["predictor"], 2),
            "peak_rss_mib": round(_vm_hwm_mib(), 1),
            "model_grid": list(grid.shape),
            "windows": windows(grid.shape, c),
            "labels_shape": list(labels.shape[1:]),
            "foreground_voxels": int((labels > 0).sum()),
            # what ran: the bundle's measured default (CLINBUNDLE_RUNTIME overrides) and batch
            "runtime": bundle.runtime_name,
            "runtime_reason": bundle.runtime_reason,
            "sw_batch_size": bundle.sw_batch_size,
            "contract": {
                "family": c.network.family,
                "filters": c.network.kwargs.get("filters"),
                "roi": list(c.roi_size),
                "spacing": c.geometry.spacing,
                "orientation": c.geometry.orientation,
            },
        }
    )


def flops_per_window(bundle_dir: Path) -> float:
    from clinbundle.packaging.measure import patch_flops
    from clinbundle.runtime.bundle_reader import read_manifest
    from clinbundle.runtime.contract import InferenceContract
    from clinbundle.runtime.networks import build_network

    contract = InferenceContract.model_validate(read_manifest(bundle_dir)["contract"])
    return float(patch_flops(build_network(contract.network), contract))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True, help="an ONNX bundle folder")
    ap.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    ap.add_argument("--spacing", type=float, nargs=3, default=[0.7, 0.7, 1.5])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sgemm = sgemm_gflops()
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(
        target=_child,
        args=(str(args.bundle), tuple(args.shape), tuple(args.spacing), args.threads, q),
    )
    p.start()
    result = q.get(timeout=3600)
    p.join()
    gflop = flops_per_window(args.bundle) * result["windows"] / 1e9
    report = {
        "benchmark": "whole_ct",
        "volume": {"shape": args.shape, "dtype": "int16", "spacing_mm": args.spacing},
        "orientation": "LPS",
        "threads": args.threads,
        "sgemm_gflops": round(sgemm, 1),
        "gflop": round(gflop, 1),
        "achieved_gflops": round(gflop / result["seconds"], 1),
        "fraction_of_sgemm": round(gflop / result["seconds"] / sgemm, 3),
        **result,
        "targets": {
            "peak RSS <= 4096 MiB on a 2-core, 24 GiB machine (issue 13)": result["peak_rss_mib"]
            <= 4096,
            "<= 40 s with the quickstart model on 2 cores (issue 15)": result["seconds"] <= 40,
            "sliding-window layer <= 2% of the predictor (issue 15)": result[
                "sliding_window_layer_pct_of_predictor"
            ]
            <= 2,
        },
        "machine": {"cpu": platform.processor() or platform.machine()},
        "versions": {"torch": torch.__version__},
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
