"""Issue 15: every bundle ships its runtimes measured, parity-checked, and runs the fastest."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from clinbundle.packaging.parity import Tolerances
from clinbundle.runtime.aoti_runner import RuntimeMismatch, build_info, check_build
from clinbundle.runtime.bundle_reader import load_bundle
from clinbundle.runtime.errors import ParityError
from clinbundle.runtime.threads import THREADS_ENV, physical_cores, resolve_threads
from tests.conftest import package_champion

#: every one must pass the fp32 gate on the tiny model's parity suite (issue 15's acceptance)
SHIPPED = ("onnxruntime", "openvino", "pytorch-aoti")


def passers(table: dict) -> list[str]:
    return [n for n, e in table["candidates"].items() if e["passed"]]


def manifest_of(bundle) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_packaging_measures_candidates_and_defaults_to_the_fastest(packaged):
    table = manifest_of(packaged.bundle)["runtimes"]
    cands = table["candidates"]
    for name in SHIPPED:
        e = cands[name]
        assert e["parity"]["max_abs"] is not None and e["description"].startswith(
            name.split("-")[0]
        )
        assert e["passed"] and e["parity"]["max_abs"] <= e["tolerances"]["max_abs"], (name, e)
        assert e["seconds"] > 0 and e["gflops"] > 0 and e["peak_rss_mb"] > 0, e
        assert e["sgemm_pct"] == pytest.approx(100 * e["gflops"] / table["sgemm_gflops"], rel=0.01)
    assert table["sgemm_gflops"] > 0 and table["gflop_per_volume"] > 0
    fp32 = {n: e["seconds"] for n, e in cands.items() if e["passed"] and e["precision"] == "fp32"}
    assert table["default"] == min(fp32, key=fp32.get)
    assert table["allocator"].startswith("glibc, large blocks kept in the heap"), table
    files = manifest_of(packaged.bundle)["files"]
    assert "runtimes/model.pt2" in files and cands["pytorch-aoti"]["build"] == build_info()
    card = (packaged.bundle / "README.md").read_text()
    assert "## Runtimes" in card and f"| {table['default']} (default) |" in card
    for name in SHIPPED:
        assert f"| {name}" in card


def test_loading_the_compiled_package_builds_no_compiler_probe(packaged, tmp_path):
    """torch's loader would compile ISA test programs (~18 s, files in the Inductor cache) to
    log a mismatch that `check_build` already refuses: a fresh cache stays empty, and the
    loaded package still runs a window (its parity is the bundle's runtime table's)."""
    cache = tmp_path / "inductor"
    code = (
        "import sys, torch; from pathlib import Path\n"
        "from clinbundle.runtime.aoti_runner import load_package\n"
        "model = load_package(Path(sys.argv[1]))\n"
        "x = torch.zeros(1, 1, *map(int, sys.argv[2:]))\n"
        "print(tuple(model(x).shape))\n"
    )
    roi = [str(r) for r in packaged.model.contract.roi_size]
    pt2 = str(packaged.bundle / "runtimes" / "model.pt2")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    proc = subprocess.run(
        [sys.executable, "-c", code, pt2, *roi], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    classes = packaged.model.contract.num_classes
    assert proc.stdout.strip() == str((1, classes, *map(int, roi)))
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))[:5]


def test_a_single_window_runs_as_a_pair_and_keeps_its_own_answer(packaged):
    """Batch 1 is slow in the compiled package (~3x a pair on 2 cores): the predictor runs the
    window twice and keeps one answer, the one the package gives that window inside a pair."""
    import torch

    from clinbundle.runtime.aoti_runner import aoti_predictor, load_package

    pt2 = packaged.bundle / "runtimes" / "model.pt2"
    roi = packaged.model.contract.roi_size
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 1, *roi)).astype(np.float32))
    single = aoti_predictor(pt2)(x)
    pair = load_package(pt2)(torch.cat([x, torch.zeros_like(x)]))
    assert single.shape == (1, packaged.model.contract.num_classes, *roi)
    torch.testing.assert_close(single, pair[:1], rtol=0, atol=0)


def test_openvino_keeps_the_staged_norm_means_and_passes_on_padded_cases(packaged):
    """OpenVINO's ReduceMerge used to fold the per-axis means of every exported instance norm
    into one reduction over the whole patch, summed by its CPU plugin in one fp32 run: up to
    1.5e-4 on the cases MONAI zero-pads (smaller than the roi), over the 1e-4 gate. Each plugin
    reduction must cover one axis (`onnx_export._staged_mean`), and those cases must pass."""
    from clinbundle.runtime.openvino_runner import openvino_compiled

    contract = packaged.model.contract
    compiled = openvino_compiled(packaged.bundle / "model.onnx", contract, "f32", 1, "cpu")
    ops = compiled.get_runtime_model().get_ordered_ops()
    reduces = [op for op in ops if op.get_rt_info()["layerType"].astype(str) == "Reduce"]
    assert reduces, "the norms' means are no longer plain reductions: re-check this test"
    for op in reduces:
        shapes = zip(op.get_input_partial_shape(0), op.get_output_partial_shape(0), strict=True)
        reduced = [axis for axis, (i, o) in enumerate(shapes) if i != o]
        assert len(reduced) <= 1, (op.get_friendly_name(), reduced)
    report = json.loads(
        (packaged.bundle / "parity" / "runtimes" / "openvino" / "parity_report.json").read_text()
    )
    cases, gate = {c["name"]: c for c in report["cases"]}, report["tolerances"]["max_abs"]
    assert gate == Tolerances.for_precision("fp32").max_abs  # not loosened for OpenVINO
    for name in ("smaller_than_roi", "anisotropic"):  # both padded to the roi along an axis
        shape = cases[name]["shape"][2:]
        assert any(s < r for s, r in zip(shape, contract.roi_size, strict=True)), shape
        assert cases[name]["passed"] and cases[name]["max_abs"] <= gate, cases[name]


def test_loading_runs_the_default_or_the_override(packaged, monkeypatch, caplog):
    default = manifest_of(packaged.bundle)["runtimes"]["default"]
    caplog.set_level(logging.INFO, logger="clinbundle.runtime")
    bundle = load_bundle(packaged.bundle, "cpu")
    assert bundle.runtime_name == default and "default" in bundle.runtime_reason
    assert f"runtime {default}" in caplog.text
    sample = np.load(packaged.bundle / "sample" / "input.npy")
    expected = np.load(packaged.bundle / "sample" / "reference.npy")
    table = manifest_of(packaged.bundle)["runtimes"]
    for name in passers(table):
        monkeypatch.setenv("CLINBUNDLE_RUNTIME", name)
        forced = load_bundle(packaged.bundle, "cpu")
        assert forced.runtime_name == name and "CLINBUNDLE_RUNTIME" in forced.runtime_reason
        assert forced.runtime.description.startswith(name)
        tol = table["candidates"][name]["tolerances"]["max_abs"] or 0.05  # bf16: Dice rule
        assert np.abs(forced.predict(sample) - expected).max() <= tol, name
    for name in set(table["candidates"]) - set(passers(table)):  # refused, with its numbers
        monkeypatch.setenv("CLINBUNDLE_RUNTIME", name)
        with pytest.raises(ParityError, match=rf"'{name}' failed parity .*max_abs=\d"):
            load_bundle(packaged.bundle, "cpu")
    monkeypatch.setenv("CLINBUNDLE_RUNTIME", "tensorrt")
    with pytest.raises(Exception, match="not in this bundle"):
        load_bundle(packaged.bundle, "cpu")


def test_the_window_batch_is_measured_recorded_and_overridable(packaged, monkeypatch, caplog):
    table = manifest_of(packaged.bundle)["runtimes"]
    sw = table["sw_batch"]
    tol = table["candidates"][sw["runtime"]]["tolerances"]["max_abs"]
    assert sw["runtime"] == table["default"] and {"1", "2", "4", "8"} <= set(sw["seconds"])
    allowed = {b: s for b, s in sw["seconds"].items() if sw["max_abs_vs_contract_batch"][b] <= tol}
    assert str(sw["chosen"]) == min(allowed, key=allowed.get), sw
    assert (
        f"Sliding-window batch: **{sw['chosen']}**" in (packaged.bundle / "README.md").read_text()
    )
    caplog.set_level(logging.INFO, logger="clinbundle.runtime")
    monkeypatch.delenv("CLINBUNDLE_SW_BATCH_SIZE", raising=False)
    bundle = load_bundle(packaged.bundle, "cpu")
    assert bundle.sw_batch_size == sw["chosen"], bundle.runtime.description
    assert f"sliding-window batch {sw['chosen']} (the fastest measured" in caplog.text
    sample = np.load(packaged.bundle / "sample" / "input.npy")
    expected = np.load(packaged.bundle / "sample" / "reference.npy")
    monkeypatch.setenv("CLINBUNDLE_SW_BATCH_SIZE", "3")
    forced = load_bundle(packaged.bundle, "cpu")
    assert forced.sw_batch_size == 3 and "window batch 3" in forced.runtime.description
    assert np.abs(forced.predict(sample) - expected).max() <= tol
    monkeypatch.setenv("CLINBUNDLE_SW_BATCH_SIZE", "0")
    with pytest.raises(ValueError, match="CLINBUNDLE_SW_BATCH_SIZE='0'"):
        load_bundle(packaged.bundle, "cpu")


def test_verify_rechecks_every_shipped_runtime(packaged, caplog):
    from clinbundle.cli import main

    caplog.set_level(logging.INFO, logger="clinbundle.onnx")
    assert main(["verify", str(packaged.bundle), "--device", "cpu"]) == 0
    for name in passers(manifest_of(packaged.bundle)["runtimes"]):
        assert f"verify: runtime {name} reproduces the sample" in caplog.text


@pytest.mark.slow
def test_a_runtime_that_failed_parity_is_recorded_and_refused(tracking, tmp_path, monkeypatch):
    """bf16 held to an fp32-like max abs fails honestly (bf16 keeps 8 bits of mantissa)."""
    from clinbundle.runtime.openvino_runner import openvino_bf16_capable

    if not openvino_bf16_capable():
        pytest.skip("this CPU has no bf16 units: OpenVINO offers no bf16 candidate")
    out = tmp_path / "bundle"
    rc = package_champion(
        tracking,
        "onnx",
        out,
        "--runtimes",
        "all",
        "--bf16-max-abs",
        "1e-4",
        "--bench-shape",
        "32",
        "32",
        "32",
    )
    assert rc == 0
    table = manifest_of(out)["runtimes"]
    failed = table["candidates"]["openvino-bf16"]
    assert not failed["passed"] and failed["parity"]["max_abs"] > 1e-4, failed
    assert "seconds" not in failed and table["default"] != "openvino-bf16"
    assert "openvino-bf16 | bf16 |" in (out / "README.md").read_text()
    monkeypatch.setenv("CLINBUNDLE_RUNTIME", "openvino-bf16")
    with pytest.raises(ParityError, match=r"failed parity .*max_abs=\d\.\d+e-0\d"):
        load_bundle(out, "cpu")
    from clinbundle.cli import main

    assert main(["verify", str(out), "--device", "cpu"]) != 0  # the forced runtime is refused


def test_a_bf16_bundle_defaults_to_the_fastest_runtime_bf16_included(tracking, tmp_path):
    """`--bf16`: the same fp32 graph, its fp32 candidates held to fp32 tolerances, the bf16 one
    to the Dice rule, and the fastest of them all the default; verify re-checks every one. A
    CPU without bf16 units refuses it instead (exit 2, no folder)."""
    from clinbundle.runtime.openvino_runner import openvino_bf16_capable

    out = tmp_path / "bundle"
    # the version's parity report is then the same suite as `packaged`'s (test_packaging)
    small = ["--bench-shape", "32", "32", "32"]
    rc = package_champion(tracking, "onnx", out, "--bf16", "--runtimes", "all", *small)
    if not openvino_bf16_capable():  # nothing could be its default here: refused, no folder
        assert rc == 2 and not out.exists()
        return
    assert rc == 0
    manifest = manifest_of(out)
    table = manifest["runtimes"]
    cands = table["candidates"]
    assert manifest["precision"] == "bf16" and cands["openvino-bf16"]["passed"]
    assert cands["openvino-bf16"]["tolerances"] == vars(Tolerances.for_precision("bf16"))
    for name in SHIPPED:
        assert cands[name]["passed"] and cands[name]["tolerances"] == vars(Tolerances()), name
    assert table["default"] == min(passers(table), key=lambda n: cands[n]["seconds"])
    assert "a bf16 bundle: its default is the fastest" in (out / "README.md").read_text()
    assert load_bundle(out, "cpu").runtime_name == table["default"]
    assert load_bundle(out, "cpu", runtime="openvino-bf16").runtime_name == "openvino-bf16"
    from clinbundle.cli import main

    assert main(["verify", str(out), "--device", "cpu"]) == 0


def test_a_bf16_bundle_without_its_candidates_is_refused_and_not_made(tracking, tmp_path):
    """Nothing could be a bf16 bundle's default with the candidates off: exit 2, no folder."""
    out = tmp_path / "bundle"
    assert package_champion(tracking, "onnx", out, "--bf16", "--runtimes", "onnxruntime") == 2
    assert not out.exists()


def test_compiled_package_refuses_another_machine():
    check_build(build_info())
    other = build_info() | {"cpu_capability": "NEON", "torch": "1.0.0"}
    with pytest.raises(
        RuntimeMismatch, match="torch built for 1.0.0.*cpu_capability built for NEON"
    ):
        check_build(other)


def test_threads_default_to_physical_cores(monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="clinbundle.runtime")
    monkeypatch.delenv(THREADS_ENV, raising=False)
    assert resolve_threads() == physical_cores() >= 1
    assert "physical cores" in caplog.text
    monkeypatch.setenv(THREADS_ENV, "3")
    assert resolve_threads() == 3 and resolve_threads(1) == 1
    monkeypatch.setenv(THREADS_ENV, "many")
    with pytest.raises(ValueError, match="positive whole number"):
        resolve_threads()


#: Allocates and frees 64 MiB five times; prints the setting and the bytes glibc mapped anew.
ALLOCATIONS = """
import ctypes, json, sys
from clinbundle.runtime.allocator import tune_allocator

class Info(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
setting = tune_allocator()
before, mapped = libc.mallinfo2().hblkhd, []
for _ in range(5):
    block = libc.malloc(64 << 20)
    mapped.append(libc.mallinfo2().hblkhd - before)
    libc.free(block)
print(json.dumps({"setting": setting, "mapped": mapped}))
"""


def _allocations(**env: str) -> dict:
    import os

    out = subprocess.run(
        [sys.executable, "-c", ALLOCATIONS],
        env={k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_allocator_keeps_large_blocks_in_the_heap_unless_told_not_to():
    # glibc maps a 64 MiB block on its own (mmap) and unmaps it at free: every sliding-window
    # buffer then costs fresh zeroed pages. Tuned, no block is mapped; the default maps each.
    tuned = _allocations(CLINBUNDLE_MALLOC="keep")
    assert tuned["setting"].startswith("glibc, large blocks kept in the heap"), tuned
    assert tuned["mapped"] == [0] * 5, tuned
    default = _allocations(CLINBUNDLE_MALLOC="default")
    assert "CLINBUNDLE_MALLOC=default" in default["setting"]
    assert all(m >= 64 << 20 for m in default["mapped"]), default
    theirs = _allocations(GLIBC_TUNABLES="glibc.malloc.mmap_max=0")
    assert theirs["setting"].startswith("GLIBC_TUNABLES"), theirs
    bad = subprocess.run(
        [sys.executable, "-c", ALLOCATIONS],
        env={**__import__("os").environ, "CLINBUNDLE_MALLOC": "fast"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "CLINBUNDLE_MALLOC='fast'" in bad.stderr
