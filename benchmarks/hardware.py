"""The machine's own limit that benchmark figures are set against: sgemm GFLOP/s, same process.

The probe itself is `clinbundle.packaging.measure.sgemm_gflops` (packaging uses it too); the
benchmarks take a larger product (2048^2, 10 times) for a steadier figure.
"""

from __future__ import annotations

from clinbundle.packaging.measure import sgemm_gflops as _sgemm


def sgemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    return _sgemm(n, repeats)
