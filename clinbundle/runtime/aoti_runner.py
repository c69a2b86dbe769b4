"""Compiled PyTorch: an AOTInductor package (`model.pt2`) made at packaging time with
`torch.export` + `torch._inductor.aoti_compile_and_package`, loaded here with
`torch._inductor.aoti_load_package` (no training code, no Python model class, nothing unpickled).

AOTInductor rather than `torch.compile(..., freezing)` at load time: compiling costs tens of
seconds on 2 cores (33-60 s for the tests' tiny DynUNet, minutes for larger ones), which every
serving process and every `verify` would pay again; the package pays it once, at packaging.

The package holds machine code for the packaging CPU's vector ISA and is tied to the torch
version that built it, so its build record (`build_info`) is checked before loading: a mismatch
is refused with both records (the caller may fall back to another runtime, logged).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import BundleError, DeviceError
from clinbundle.runtime.inference import Predictor
from clinbundle.runtime.runners import Runtime, local_runtime

log = logging.getLogger("clinbundle.runtime")


class RuntimeMismatch(BundleError):
    """A shipped runtime cannot run on this machine (ISA or library version)."""


def build_info() -> dict[str, str]:
    """What an AOTInductor package built here depends on."""
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def check_build(recorded: dict[str, str]) -> None:
    here = build_info()
    wrong = {k: (v, here.get(k)) for k, v in recorded.items() if here.get(k) != v}
    if wrong:
        said = ", ".join(f"{k} built for {a}, here {b}" for k, (a, b) in wrong.items())
        raise RuntimeMismatch(f"the compiled PyTorch package does not fit this machine: {said}")


@contextlib.contextmanager
def _no_isa_probe() -> Iterator[None]:
    """`aoti_load_package` compares the package's build with `get_device_information`, whose
    `pick_vec_isa()` compiles and runs a test program per vector ISA (~18 s on 2 cores, and files
    in the Inductor cache) only to log a warning on a mismatch. `check_build` has already refused
    a package of another ISA (torch's own cheap `get_cpu_capability`), so the probe is replaced
    while loading. Loading runs under `aoti_predictor`'s lock; nothing else in a clinbundle
    process compiles while a package loads."""
    from torch._inductor import codecache

    probe = codecache.get_device_information

    def without_isa(device_type: str) -> dict[str, str]:
        return {"AOTI_PLATFORM": sys.platform, "AOTI_MACHINE": platform.machine()}

    codecache.get_device_information = without_isa
    try:
        yield
    finally:
        codecache.get_device_information = probe


def load_package(path: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """The compiled model of `path`, loaded without torch's ISA compiler probes."""
    with _no_isa_probe():
        return torch._inductor.aoti_load_package(str(path))


def aoti_predictor(path: Path) -> Predictor:
    """Loads the package on the first call, not when the bundle opens: loading (torch._inductor
    and the package's shared library) costs several seconds that a page or a server would
    otherwise spend before it can answer at all. The manifest hash and the build record are
    checked at open time all the same, so a late load meets a known-good file.

    A batch of one window runs as two (the window twice, one answer kept): the package is
    compiled at batch 2 with a dynamic batch, and at batch 1 it took 155 ms per call against
    52 ms for two windows (quickstart DynUNet, 2 cores, torch 2.13). Batch 1 is the last,
    partial batch of many volumes, and every volume smaller than the roi."""
    lock = threading.Lock()  # one model container per package: calls take turns
    loaded: list = []

    def predict(patches: torch.Tensor) -> torch.Tensor:
        x = patches.detach().to("cpu", torch.float32).contiguous()
        with lock:
            if not loaded:
                loaded.append(load_package(path))
                log.info("AOTInductor package %s loaded", path.name)
            if x.shape[0] == 1:
                return loaded[0](x.expand(2, *x.shape[1:]).contiguous())[:1]
            return loaded[0](x)

    return predict


def aoti_runtime(
    path: Path,
    contract: InferenceContract,
    recorded: dict[str, str],
    threads: int = 1,
    device: str = "cpu",
) -> Runtime:
    """Refuses (RuntimeMismatch) before loading when the package was built for another machine."""
    if device == "cuda":
        raise DeviceError("the compiled PyTorch package is a CPU build; use another runtime")
    check_build(recorded)
    torch.set_num_threads(threads)
    log.info(
        "AOTInductor package %s (%s), %d threads: loads on first use", path.name, recorded, threads
    )
    return local_runtime(
        aoti_predictor(path),
        contract,
        "cpu",
        f"pytorch {torch.__version__} AOTInductor ({recorded['cpu_capability']}), {threads} threads",
    )
