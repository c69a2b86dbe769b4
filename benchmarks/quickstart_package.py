"""How long `clinbundle quickstart --package` takes after install: synthetic data, training,
promotion, then every format parity-checked (issue 18.5's goal: under 5 minutes on 2 idle cores).

    python benchmarks/quickstart_package.py [--workdir DIR] [--out benchmarks/quickstart_package.json]

Runs the real command in a fresh work dir as a process of its own and reports the wall time,
the time to the champion and each format's seconds (from the command's own output), with the
machine's cores and its load average before and after: a load above the core count means other
work shared the CPUs and the times are upper bounds. The CPU seconds of the command and all its
children (user + system) do not grow with contention: on 2 idle cores the wall time is at least
half of them. The same process's sgemm rate, measured just before, says how fast the machine
was. The compiled-PyTorch and Inductor caches start empty (`CLINBUNDLE_CACHE_DIR`,
`TORCHINDUCTOR_CACHE_DIR` in the temp dir), as on a new user's machine; `--warm-caches` keeps
the caller's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", help="fresh work dir (default: a temp dir, removed after)")
    p.add_argument("--out", default=str(Path(__file__).with_name("quickstart_package.json")))
    p.add_argument("--warm-caches", action="store_true", help="keep the compile caches")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qs-bench-")) / "work"
    if work.exists():
        raise SystemExit(f"{work} exists: the benchmark needs a fresh work dir")
    log = work.parent / "quickstart.log"  # its log, for when it fails
    env = dict(os.environ)
    if not args.warm_caches:
        for var, name in (
            ("CLINBUNDLE_CACHE_DIR", "cache"),
            ("TORCHINDUCTOR_CACHE_DIR", "inductor"),
        ):
            env[var] = str(work.parent / name)
    from clinbundle.packaging.measure import sgemm_gflops

    sgemm = sgemm_gflops()  # the machine's speed, so the wall time can be compared across them
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "clinbundle", "quickstart", "--package", "--workdir", str(work)],
        stdout=subprocess.PIPE,
        stderr=log.open("w"),
        text=True,
        env=env,
    )
    champion_s, lines = None, []
    for line in proc.stdout or []:
        # the recorded output names the work dir WORKDIR: no path of the measuring machine
        lines.append(line.rstrip().replace(str(work), "WORKDIR"))
        if champion_s is None and line.startswith("held-out Dice"):
            champion_s = time.perf_counter() - t0
    total = time.perf_counter() - t0
    proc.wait()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    formats = {
        m[1]: float(m[2])
        for m in (re.match(r"  (.+?): \S+ \((\d+) s; parity", x) for x in lines)
        if m
    }
    result = {
        "command": "clinbundle quickstart --package",
        "exit_code": proc.returncode,
        "total_s": round(total, 1),
        "to_champion_s": None if champion_s is None else round(champion_s, 1),
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
        "formats_s": formats,
        "goal_s": 300,
        "compile_caches": "warm (the caller's)" if args.warm_caches else "empty",
        "cpu_count": os.cpu_count(),
        "sgemm_gflops_before": round(sgemm, 1),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        # the load before: after, it is the command's own (bento and MAP run side by side)
        "contended": load_before[0] > (os.cpu_count() or 1),
        "output": lines,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "output"}, indent=2))
    if proc.returncode != 0:
        print(f"failed (exit {proc.returncode}); its log: {log}", file=sys.stderr)
    elif not args.workdir:
        shutil.rmtree(work.parent, ignore_errors=True)
    return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
