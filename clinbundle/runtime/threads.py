"""How many threads a runtime gets: physical cores unless told otherwise.

Hyper-threads share one core's FMA units, so a second thread per core slows convolutions down;
`os.cpu_count()` counts them. The count is read from sysfs (core ids per package, limited to the
CPUs this process may run on) because no maintained library in the serving stack reports
physical cores (psutil is not a dependency of the shipped formats).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("clinbundle.runtime")

THREADS_ENV = "CLINBUNDLE_THREADS"


def physical_cores() -> int:
    """Distinct (package, core) pairs among the CPUs this process may use."""
    cpus = sorted(os.sched_getaffinity(0))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            return len(cpus)
        cores.add((pkg, core))
    return max(1, len(cores))


def resolve_threads(threads: int | None = None) -> int:
    """`threads` if given, else CLINBUNDLE_THREADS, else the physical cores; logged."""
    if threads:
        why = "asked for"
    elif os.environ.get(THREADS_ENV, "").strip():
        raw = os.environ[THREADS_ENV].strip()
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{THREADS_ENV}={raw!r}: give a positive whole number")
        threads, why = int(raw), THREADS_ENV
    else:
        threads, why = physical_cores(), "physical cores (set CLINBUNDLE_THREADS to change)"
    log.info("inference threads: %d (%s)", threads, why)
    return threads
