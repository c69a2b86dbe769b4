"""Where a network's time goes, layer by layer, against the same run's sgemm rate.

The runtimes benchmark gives one number per network; this one says why it is that number. One
window batch (the contract's sw batch of 4) through eager fp32 PyTorch (oneDNN convolutions, the
kernels AOTInductor also calls for convolutions), with every Conv3d / ConvTranspose3d timed by
forward hooks: each layer's shape, GFLOP, milliseconds, GFLOP/s and % of sgemm, then the totals.
The convolutions carry every FLOP counted, so their own % of sgemm (`conv_sgemm_pct`) bounds what
any runtime calling the same kernels can reach, however well it fuses the rest (norms,
activations, copies: `other_ms`).

    python benchmarks/conv_layers.py --out benchmarks/conv_layers.json
    python benchmarks/conv_layers.py --channels-last --out benchmarks/conv_layers_channels_last.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from runtimes import NETS
from torch.utils.flop_counter import FlopCounterMode

from clinbundle.packaging.measure import sgemm_gflops
from clinbundle.runtime.allocator import tune_allocator
from clinbundle.runtime.networks import build_network, network_spec

CONVS = (torch.nn.Conv3d, torch.nn.ConvTranspose3d)


def conv_flops(net: torch.nn.Module, x: torch.Tensor) -> dict[str, int]:
    """FLOPs of each convolution module of one call, by PyTorch's FlopCounterMode (as
    `clinbundle.packaging.measure.patch_flops` counts the whole network)."""
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    counts = counter.get_flop_counts()
    root = type(net).__name__
    return {
        name: int(sum(counts.get(f"{root}.{name}", {}).values()))
        for name, m in net.named_modules()
        if isinstance(m, CONVS)
    }


def profile(net: torch.nn.Module, x: torch.Tensor, repeats: int) -> tuple[dict, float]:
    """Per-conv (seconds, flops, shape) summed over `repeats` calls, and the median call."""
    flops = conv_flops(net, x)
    rows: dict[str, list] = {}

    def pre(m, _inputs):
        m.started = time.perf_counter()

    def post(m, inputs, y):
        row = rows.setdefault(m.label, [0.0, 0, f"{tuple(inputs[0].shape)} -> {tuple(y.shape)}"])
        row[0] += time.perf_counter() - m.started
        row[1] += flops[m.label]

    for name, m in net.named_modules():
        if isinstance(m, CONVS):
            m.label = name
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    calls = []
    with torch.inference_mode():
        for _ in range(2):
            net(x)
        rows.clear()
        for _ in range(repeats):
            t0 = time.perf_counter()
            net(x)
            calls.append(time.perf_counter() - t0)
    return rows, statistics.median(calls)


def bench_net(name: str, repeats: int, batch: int, channels_last: bool) -> dict:
    filters, roi = NETS[name]
    net = build_network(network_spec("dynunet", 1, 2, filters)).eval()
    x = torch.randn(batch, 1, roi, roi, roi)
    if channels_last:
        net, x = (t.to(memory_format=torch.channels_last_3d) for t in (net, x))
    sgemm = [sgemm_gflops()]
    rows, call_s = profile(net, x, repeats)
    sgemm.append(sgemm_gflops())
    rate = statistics.median(sgemm)
    layers = []
    for label, (seconds, flops, shape) in sorted(rows.items(), key=lambda r: -r[1][0]):
        g = flops / seconds / 1e9
        layers.append(
            {
                "layer": label,
                "shape": shape,
                "gflop": round(flops / repeats / 1e9, 3),
                "ms": round(1e3 * seconds / repeats, 2),
                "gflops": round(g, 1),
                "sgemm_pct": round(100 * g / rate, 1),
            }
        )
    conv_s = sum(r[0] for r in rows.values()) / repeats
    flops = sum(r[1] for r in rows.values()) / repeats
    return {
        "filters": filters,
        "roi": [roi] * 3,
        "batch": batch,
        "sgemm_gflops_median": round(rate, 1),
        "network_ms": round(1e3 * call_s, 1),
        "network_sgemm_pct": round(100 * flops / call_s / 1e9 / rate, 1),
        "conv_ms": round(1e3 * conv_s, 1),
        "conv_sgemm_pct": round(100 * flops / conv_s / 1e9 / rate, 1),
        "other_ms": round(1e3 * max(call_s - conv_s, 0.0), 1),
        "layers": layers,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="windows per call (the sw batch)")
    ap.add_argument("--channels-last", action="store_true", help="NDHWC weights and input")
    ap.add_argument("--out", default="benchmarks/conv_layers.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "threads": args.threads,
        "allocator": tune_allocator(),
        "torch": torch.__version__,
        "memory_format": "channels_last_3d" if args.channels_last else "contiguous (NCDHW)",
        "nets": {n: bench_net(n, args.repeats, args.batch, args.channels_last) for n in NETS},
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for n, r in result["nets"].items():
        print(
            f"{n}: network {r['network_ms']} ms ({r['network_sgemm_pct']}% of sgemm), convs "
            f"{r['conv_ms']} ms ({r['conv_sgemm_pct']}%), other {r['other_ms']} ms"
        )


if __name__ == "__main__":
    main()
