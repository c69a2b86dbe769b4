"""Measuring a runtime against the machine: sgemm GFLOP/s in the same process, the network's
FLOPs per volume, the peak resident memory while one run lasts, and the time spent inside a
predictor (so the sliding-window layer around it can be told apart).

A time alone says little on a shared machine; the same run's sgemm rate is the yardstick (a
runtime at 100% does the network's arithmetic as fast as one large matrix product would).
FLOPs come from PyTorch's own `FlopCounterMode` on one patch; the number of patches from the
sliding window's layout (MONAI's scan interval: roi * (1 - overlap), at least 1).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from clinbundle.runtime.contract import InferenceContract


class TimedPredictor:
    """A predictor that adds up the seconds spent inside it: what the one inference path adds
    around the network is then a call's own time minus `seconds`."""

    def __init__(self, predictor: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.predictor = predictor
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, patches: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.predictor(patches)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


def sgemm_gflops(n: int = 1024, repeats: int = 8) -> float:
    """fp32 matrix product rate with the process's current thread setting."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def patch_flops(network: torch.nn.Module, contract: InferenceContract) -> int:
    x = torch.zeros(1, contract.in_channels, *contract.roi_size)
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        network.eval()(x)
    return int(counter.get_total_flops())


def windows(shape: tuple[int, int, int], contract: InferenceContract) -> int:
    """How many patches MONAI's sliding window runs over a volume of `shape`."""
    n = 1
    for size, roi in zip(shape, contract.roi_size, strict=True):
        size = max(size, roi)
        step = max(int(roi * (1 - contract.overlap)), 1)
        n *= math.ceil((size - roi) / step) + 1 if size > roi else 1
    return n


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_with_peak_rss(fn: Callable[[], object], interval: float = 0.005) -> tuple[float, int]:
    """(seconds, peak resident bytes sampled while `fn` ran): the process's high-water mark
    (ru_maxrss) only ever grows, so one run's own peak is sampled."""
    peak, done = [_rss()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    return seconds, max(peak[0], _rss())
