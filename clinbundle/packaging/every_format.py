"""`clinbundle quickstart --package`: the champion as every format, each held to one PyTorch
reference (computed once), and the one command that serves or runs each.

    champion -> PyTorch reference on the parity suite (once)
    -> ONNX bundle -> bento (HTTP parity) -> MAP build context (app parity) -> MONAI bundle
       (`monai.bundle run` parity)                       (a breach stops here, exit 3)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from clinbundle.packaging.model_source import ResolvedModel

log = logging.getLogger("clinbundle.every_format")


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
    """ONNX bundle, bento, MAP build context and MONAI bundle of `model` under `workdir`,
    replacing earlier ones; ParityError (that format not written, later ones not tried) on a
    breach. The device is the CPU, as for the reference."""
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
    bento = workdir / "bento"
    archive, report = build_bento(model, onnx, bento, force=True, reference=reference)
    done("bento", archive, report, t, f"clinbundle serve {shown(bento)} --workdir {wd} --port 3000")

    t = time.perf_counter()
    map_dir, report = build_map(model, workdir / "map", "cpu", force=True, reference=reference)
    done("MAP", map_dir, report, t, f"clinbundle run-map {shown(map_dir)} -i scans -o results")

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
    return shipped


def describe(shipped: list[Shipped]) -> str:
    """What quickstart prints: each format, its parity, its seconds and its command."""
    lines = ["packaged (each parity-checked against PyTorch):"]
    for s in shipped:
        lines.append(f"  {s.format}: {shown(s.path)} ({s.seconds:.0f} s; parity {s.parity})")
        lines.append(f"    $ {s.command}")
    return "\n".join(lines)
