"""What each training loss costs per step, next to the network's own forward + backward.

One optimisation step of the quickstart network (DynUNet [8, 16, 32, 64]) on a batch of 48^3
patches, timed with each loss (`clinbundle.training.losses.build_loss`), and the loss alone
(forward + backward on the same logits). Reports median seconds as JSON: the question it answers
is whether `cbdice_cldice` could replace `dice_ce` at no loss of speed (on a CPU it cannot: the
soft skeleton's max-pools dominate).

    python benchmarks/loss_cost.py --repeats 3 --out benchmarks/loss_cost.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from clinbundle.runtime.networks import build_network, network_spec
from clinbundle.training.config import LossConfig
from clinbundle.training.losses import LOSSES, build_loss


def _median(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    torch.manual_seed(0)
    net = build_network(network_spec("dynunet", 1, 2, [8, 16, 32, 64]))
    x = torch.randn(a.batch, 1, a.patch, a.patch, a.patch)
    y = (torch.rand(a.batch, 1, a.patch, a.patch, a.patch) > 0.9).long()
    logits = torch.randn(a.batch, 2, a.patch, a.patch, a.patch, requires_grad=True)
    rows = {}
    for name in LOSSES:
        loss_fn = build_loss(LossConfig(name=name))
        step = lambda f=loss_fn: f(net(x), y).backward()  # noqa: E731
        alone = lambda f=loss_fn: f(logits, y).backward()  # noqa: E731
        rows[name] = {"step_s": _median(step, a.repeats), "loss_s": _median(alone, a.repeats)}
    base = rows["dice_ce"]["step_s"]
    for r in rows.values():
        r["step_vs_dice_ce"] = r["step_s"] / base
    out = {
        "batch": a.batch,
        "patch": a.patch,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],  # a shared machine's numbers are only ratios
        "machine": platform.processor() or platform.machine(),
        "losses": rows,
    }
    text = json.dumps(out, indent=2)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
