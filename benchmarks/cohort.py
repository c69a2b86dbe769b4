"""Cohort throughput (cases/min): the plain local loop, a local Ray, and a 2-node Ray cluster.

The same synthetic cases through the same bundle, each engine into a fresh output folder, timed
from the call to `run_cohort` to its last row (so Ray's start, actor start-up and model loading
count: that is the overhead a user pays). The local loop runs one process with the runtime's
default threads; each Ray actor gets one thread (1 CPU per node on the cluster, two actors on
the local Ray). The machine may be shared: the JSON records the load average and sgemm before
each engine's run, as the other benchmarks do; `--rounds 2` repeats the engines in turn.

    python benchmarks/cohort.py --bundle work/bundles/vessel-seg-onnx --cases 24 \
        --out benchmarks/cohort.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from clinbundle.cohort.cases import discover
from clinbundle.cohort.job import run_cohort
from clinbundle.cohort.model import ModelSpec
from clinbundle.packaging.measure import sgemm_gflops
from clinbundle.ray_cluster import LoopbackCluster
from clinbundle.training.synth import write_dataset


def timed(label: str, cases, spec: ModelSpec, out: Path, **engine) -> dict:
    """One engine's run; sgemm and the load just before it, since the load moves between runs."""
    sgemm, load = sgemm_gflops(), os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = run_cohort(cases, spec, out / label, progress=False, **engine)
    wall = time.perf_counter() - t0
    done = sum(r["status"] == "done" for r in rows)
    per_case = sorted(r["seconds"] for r in rows)
    print(f"{label}: {done}/{len(cases)} done in {wall:.1f} s ({60 * done / wall:.1f} cases/min)")
    return {
        "wall_s": round(wall, 2),
        "cases_done": done,
        "cases_per_min": round(60 * done / wall, 2),
        "median_case_s": per_case[len(per_case) // 2],
        "sgemm_gflops_before": round(sgemm, 1),
        "load_average_1min_before": round(load, 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True, help="an ONNX bundle (clinbundle package onnx)")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64])
    ap.add_argument("--rounds", type=int, default=2, help="each engine this many times, in turn")
    ap.add_argument("--out", default="benchmarks/cohort.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cohort-bench-") as tmp:
        root = Path(tmp)
        write_dataset(root / "data", n=args.cases, shape=tuple(args.shape), seed=0, n_test=0)
        cases = discover(root / "data" / "imagesTr")
        spec = ModelSpec(model=None, bundle=Path(args.bundle).resolve(), device="cpu")
        cluster = LoopbackCluster(root)
        os.environ.update({k: cluster.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")})
        result = {
            "machine": {
                "cpus": os.cpu_count(),
                "platform": platform.platform(),
                "load_average_before": os.getloadavg(),
                "sgemm_gflops_before": round(sgemm_gflops(), 1),
                "note": "shared by other jobs while measured: compare engines within this run",
            },
            "cases": len(cases),
            "shape": args.shape,
            "bundle": Path(args.bundle).name,
        }
        runs: dict[str, list[dict]] = {"local_loop": [], "ray_local": [], "ray_cluster_2_nodes": []}
        cluster.start()
        try:
            for r in range(args.rounds):  # the engines in turn, so a load change hits all
                runs["local_loop"].append(timed(f"local_loop-{r}", cases, spec, root))
                runs["ray_local"].append(timed(f"ray_local-{r}", cases, spec, root, engine="ray"))
                runs["ray_cluster_2_nodes"].append(
                    timed(f"ray_cluster-{r}", cases, spec, root, engine="ray",
                          address=cluster.address)
                )  # fmt: skip
        finally:
            cluster.stop()
        result["runs"] = runs
        best = {k: min(v, key=lambda x: x["wall_s"]) for k, v in runs.items()}
        result["best_cases_per_min"] = {k: v["cases_per_min"] for k, v in best.items()}
        base = best["local_loop"]["wall_s"]
        result["ray_local_overhead"] = {
            "extra_s": round(best["ray_local"]["wall_s"] - base, 2),
            "wall_ratio": round(best["ray_local"]["wall_s"] / base, 2),
            "note": "local Ray (start, 2 actors each loading the model) against the plain loop, "
            "best run of each",
        }
        result["machine"] |= {
            "load_average_after": os.getloadavg(),
            "sgemm_gflops_after": round(sgemm_gflops(), 1),
        }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
