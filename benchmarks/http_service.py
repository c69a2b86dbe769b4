"""The BentoML service under concurrent clients, against in-process ONNX Runtime on the same volume.

Serves a `.bento` archive (from `clinbundle package bento`) on 127.0.0.1, then for 1, 4 and 8
concurrent clients posts a 96^3 volume to /segment_array for a bounded time each, and reports
as JSON: p50/p95/p99 latency, throughput, error count and the server's RSS (all its processes),
plus the HTTP overhead at one client against in-process ONNX Runtime on the same bundle and
volume (goal, issue 5: under 10%).

    python benchmarks/http_service.py --bento OUT/x.bento --bundle work/bundles/... --seconds 20
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import psutil

from clinbundle.packaging.bento import ensure_imported, running_bento
from clinbundle.runtime.bundle_reader import load_bundle


def tree_rss_mib(root_pid: int) -> float:
    try:
        root = psutil.Process(root_pid)
        procs = [root, *root.children(recursive=True)]
        return sum(p.memory_info().rss for p in procs) / 2**20
    except psutil.Error:
        return float("nan")


def drive(url: str, payload: bytes, clients: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors: dict[str, int] = {}
    stop = time.monotonic() + seconds
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=600) as http:
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = http.post(url + "/segment_array", files={"array": ("v.npy", payload)})
                dt = time.perf_counter() - t0
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                    else:
                        errors[str(r.status_code)] = errors.get(str(r.status_code), 0) + 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    q = np.percentile(latencies, [50, 95, 99]) if latencies else [float("nan")] * 3
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": sum(errors.values()),
        "error_statuses": errors,
        "throughput_rps": round(len(latencies) / wall, 3),
        "p50_s": round(float(q[0]), 3),
        "p95_s": round(float(q[1]), 3),
        "p99_s": round(float(q[2]), 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bento", type=Path, required=True, help=".bento archive or its folder")
    ap.add_argument("--bundle", type=Path, required=True, help="the ONNX bundle inside it")
    ap.add_argument("--shape", type=int, nargs=3, default=[96, 96, 96])
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    volume = np.random.default_rng(0).normal(100, 40, args.shape).astype(np.float32)
    buf = io.BytesIO()
    np.save(buf, volume, allow_pickle=False)
    bundle = load_bundle(args.bundle, device="cpu")
    bundle.predict(volume[None, None])  # warm-up
    t0 = time.perf_counter()
    runs = 3
    for _ in range(runs):
        bundle.predict(volume[None, None])
    in_process = (time.perf_counter() - t0) / runs
    with tempfile.TemporaryDirectory() as home:
        os.environ["BENTOML_HOME"] = home
        tag = ensure_imported(args.bento)
        with running_bento(tag) as url:
            server = next(
                p
                for p in psutil.process_iter(["cmdline"])
                if "serve" in (p.info["cmdline"] or []) and tag in (p.info["cmdline"] or [])
            )
            rows = []
            for n in args.clients:
                row = drive(url, buf.getvalue(), n, args.seconds)
                row["server_rss_mib"] = round(tree_rss_mib(server.pid), 1)
                rows.append(row)
    one = next((r for r in rows if r["clients"] == 1), None)
    report = {
        "benchmark": "http_service",
        "volume_shape": args.shape,
        "in_process_onnxruntime_s": round(in_process, 3),
        "results": rows,
        "http_overhead_at_one_client": round(one["p50_s"] / in_process - 1, 3) if one else None,
        "goal": "http overhead < 10% at one client",
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
