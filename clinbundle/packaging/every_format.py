"""`clinbundle quickstart --package`: the champion as every format, each held to one PyTorch
reference (computed once), and the one command that serves or runs each.

    champion -> PyTorch reference on the parity suite (once)
    -> ONNX bundle -> MONAI bundle (`monai.bundle run` parity)
    -> bento (HTTP parity) beside the MAP build context (app parity, nesting that ONNX bundle)
                                                          (a breach stops here, exit 3)

Bento and MAP run in two threads: each is mostly one single-threaded process start-up
(`bentoml serve`; holoscan and MONAI imports in the MAP app), so one of the two cores idled.
The MONAI bundle is made before them, not beside: MONAI's `ComponentLocator` iterates
`sys.modules`, which the other threads' imports change ("dictionary changed size during
iteration").
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from clinbundle.packaging.model_source import ResolvedModel

log = logging.getLogger("clinbundle.every_format")
ORDER = ("ONNX bundle", "MONAI bundle", "bento", "MAP")  # as made, and as quickstart lists them


@dataclass
class Shipped:
    """One format written and parity-checked: where it is and how to use it."""

    format: str
    path: Path
    parity: str  # the report's one-line summary
    seconds: float
    command: str


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the current folder when inside it."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def package_every_format(model: ResolvedModel, workdir: Path) -> list[Shipped]:
    """ONNX bundle, MONAI bundle, bento and MAP build context of `model` under `workdir`,
    replacing earlier ones; ParityError (that format not written, later ones not tried; of bento
    and MAP, the other is still finished) on a breach. The device is the CPU, as for the
    reference."""
    from clinbundle.packaging.bento import build_bento
    from clinbundle.packaging.map_bundle import build_map
    from clinbundle.packaging.monai_bundle import build_monai_bundle
    from clinbundle.packaging.onnx_bundle import build_onnx_bundle, parity_reference

    name = model.name or "model"
    wd = shown(workdir)
    t0 = time.perf_counter()
    reference = parity_reference(model)
    log.info(
        "PyTorch reference on %d cases: %.0f s", len(reference.cases), time.perf_counter() - t0
    )
    shipped: list[Shipped] = []

    def done(fmt: str, path: Path, report, started: float, command: str) -> None:
        shipped.append(Shipped(fmt, path, report.summary(), time.perf_counter() - started, command))
        log.info("%s: %s (%s)", fmt, shown(path), report.summary())

    t = time.perf_counter()
    onnx = workdir / "bundles" / f"{name}-onnx"
    _, report = build_onnx_bundle(model, onnx, device="cpu", force=True, reference=reference)
    done("ONNX bundle", onnx, report, t, f"clinbundle verify {shown(onnx)}")

    t = time.perf_counter()
    mb = workdir / "bundles" / f"{name}-monai"
    _, report = build_monai_bundle(model, mb, force=True, reference=reference)
    configs = os.path.join(shown(mb), "configs", "inference.json")
    done(
        "MONAI bundle",
        mb,
        report,
        t,
        f"python -m monai.bundle run --config_file {configs} --bundle_root {shown(mb)} "
        "--dataset_dir scans --output_dir results",
    )

    def bento() -> None:
        t = time.perf_counter()
        out = workdir / "bento"
        archive, report = build_bento(model, onnx, out, force=True, reference=reference)
        done(
            "bento", archive, report, t, f"clinbundle serve {shown(out)} --workdir {wd} --port 3000"
        )

    def map_context() -> None:
        t = time.perf_counter()
        map_dir, report = build_map(
            model, workdir / "map", "cpu", force=True, reference=reference, onnx_bundle=onnx
        )
        done("MAP", map_dir, report, t, f"clinbundle run-map {shown(map_dir)} -i scans -o results")

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="package") as pool:
        pending = [pool.submit(bento), pool.submit(map_context)]
    for future in pending:  # both ran to their end: one failing leaves the other written
        future.result()
    return sorted(shipped, key=lambda s: ORDER.index(s.format))


def describe(shipped: list[Shipped]) -> str:
    """What quickstart prints: each format, its parity, its seconds and its command."""
    lines = ["packaged (each parity-checked against PyTorch):"]
    for s in shipped:
        lines.append(f"  {s.format}: {shown(s.path)} ({s.seconds:.0f} s; parity {s.parity})")
        lines.append(f"    $ {s.command}")
    return "\n".join(lines)
