"""The machine's own limit that benchmark figures are set against: sgemm GFLOP/s, same process."""

from __future__ import annotations

import time

import torch


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9
