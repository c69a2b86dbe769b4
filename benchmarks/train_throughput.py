"""Training throughput of the quickstart model, measured against the machine's own sgemm rate.

Runs the real training loop (`clinbundle.training.trainer.train`, no tracking callback) on the
quickstart's synthetic data and reports, as JSON:
  - volumes/s and voxels/s (patch voxels seen by the network) per epoch, after a warm-up epoch;
  - achieved GFLOP/s of the training step (forward + backward FLOPs counted by torch's
    FlopCounterMode), next to the sgemm GFLOP/s of the same process, and their ratio, so the
    number says how close to the hardware's limit training runs.

    python benchmarks/train_throughput.py --epochs 3 --out benchmarks/train_throughput.json
    CLINBUNDLE_MALLOC=default python benchmarks/train_throughput.py --out ...   # glibc's default
    python benchmarks/train_throughput.py --set compute.compile=true --out ...  # torch.compile
    python benchmarks/train_throughput.py --set 'model.filters=[16,32,64,128]' \
        --set 'compute.patch_size=[64,64,64]' --out ...   # the default DynUNet (issue 15)
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch
from hardware import sgemm_gflops
from torch.utils.flop_counter import FlopCounterMode

from clinbundle.quickstart import SYNTH, quickstart_config_path
from clinbundle.runtime.networks import build_network
from clinbundle.training.config import load_config
from clinbundle.training.losses import build_loss
from clinbundle.training.synth import write_dataset
from clinbundle.training.trainer import train


def step_flops(cfg, state) -> int:
    """FLOPs of one optimisation step (forward + backward) on one batch of patches."""
    net = build_network(state.contract.network)
    loss_fn = build_loss(cfg.loss)
    n = state.compute.batch_size * cfg.data.samples_per_volume
    x = torch.randn(n, 1, *state.compute.patch_size)
    y = (torch.rand(n, 1, *state.compute.patch_size) > 0.9).float()
    with FlopCounterMode(display=False) as fc:
        loss_fn(net(x), y).backward()
    return fc.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3, help="the first is a warm-up")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    ap.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="config overrides"
    )
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_dataset(data, **SYNTH)
        cfg = load_config(
            quickstart_config_path(),
            [
                f"data.root={data}",
                f"train.epochs={args.epochs}",
                f"train.val_every={args.epochs}",
                *args.set,
            ],
        )
        state = train(cfg, Path(tmp) / "run")

    n_train = len(state.split["train"])
    steps = int(np.ceil(n_train / state.compute.batch_size))
    patches = n_train * cfg.data.samples_per_volume
    epoch_s = [h["epoch_seconds"] for h in state.history[1:]] or [state.history[0]["epoch_seconds"]]
    sec = float(np.median(epoch_s))
    flops_epoch = step_flops(cfg, state) * steps
    sgemm = sgemm_gflops()
    achieved = flops_epoch / sec / 1e9
    result = {
        "benchmark": "train_throughput",
        "model": state.contract.model_family,
        "filters": cfg.model.filters,
        "patch_size": list(state.compute.patch_size),
        "batch_size": state.compute.batch_size,
        "compiled": state.compute.compile,
        "overrides": args.set,
        "samples_per_volume": cfg.data.samples_per_volume,
        "train_volumes_per_epoch": n_train,
        "epoch_seconds_median": sec,
        "volumes_per_s": n_train / sec,
        "patches_per_s": patches / sec,
        "voxels_per_s": patches * int(np.prod(state.compute.patch_size)) / sec,
        "train_gflop_per_epoch": flops_epoch / 1e9,
        "achieved_gflops": achieved,
        "sgemm_gflops": sgemm,
        "fraction_of_sgemm": achieved / sgemm,
        "device": str(state.compute.device),
        "allocator": state.compute.decisions["allocator"].value,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "note": "epoch time includes data augmentation and loading; first epoch excluded",
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
