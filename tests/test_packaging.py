"""ONNX packaging: model resolution, the parity harness, the bundle, and verify."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient

from clinbundle.packaging import onnx_bundle
from clinbundle.packaging.model_source import canonical_uri, resolve_model
from clinbundle.packaging.onnx_bundle import build_onnx_bundle, verify_bundle
from clinbundle.packaging.onnx_export import export_onnx
from clinbundle.packaging.parity import ParityCase, Reference, Tolerances, compare
from clinbundle.runtime.bundle_reader import embedded_contract, load_bundle
from clinbundle.runtime.errors import BundleError, DeviceError, ModelResolutionError, ParityError
from clinbundle.runtime.hashing import sha256_file
from clinbundle.runtime.runners import CUDA_EP, Runtime, select_providers


def test_short_forms_of_model_uris() -> None:
    assert canonical_uri(None) == "models:/vessel-seg@champion"
    assert canonical_uri("3", "liver") == "models:/liver/3"
    assert canonical_uri("liver") == "models:/liver@champion"
    assert canonical_uri("runs:/abc/model") == "runs:/abc/model"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("models:/nobody@champion", "no registered model named 'nobody'"),
        ("models:/{name}@gold", "has no alias @gold; its aliases: @challenger, @champion"),
        ("models:/{name}/99", "has no version 99"),
        ("models:/{name}", "cannot parse model URI"),
        ("s3://bucket/model", "unsupported model URI"),
        ("runs:/0123456789abcdef/model", "cannot download"),
    ],
)
def test_wrong_model_uris_are_clear_errors(tracking, tmp_path: Path, spec: str, needle) -> None:
    with pytest.raises(ModelResolutionError, match=needle):
        resolve_model(spec.format(name=tracking.name), tmp_path)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no half download left


def test_a_model_without_contract_is_refused(tracking, tmp_path: Path) -> None:
    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run(experiment_id=mlflow.get_experiment_by_name("tests").experiment_id):
        info = mlflow.pyfunc.log_model(name="model", python_model=Echo())
    mlflow.register_model(info.model_uri, "no-contract")
    with pytest.raises(ModelResolutionError, match="no inference contract"):
        resolve_model("models:/no-contract/1", tmp_path)


def test_run_uri_finds_its_registered_version(tracking, tmp_path: Path) -> None:
    m = resolve_model(f"runs:/{tracking.run_id}/model", tmp_path)
    assert (m.name, m.version, m.run_id) == (tracking.name, tracking.version, tracking.run_id)
    assert m.contract.num_classes == 2 and m.weights_path.is_file()


def test_reference_runs_each_suite_volume_once_and_keeps_its_time() -> None:
    """One packaging run checks several formats against one PyTorch pass over the suite."""
    calls: list[int] = []

    def run(volume: np.ndarray, affine: np.ndarray | None = None) -> np.ndarray:
        calls.append(id(volume))
        return volume * 2

    suite = [ParityCase("a", np.ones((1, 1, 2, 2, 2), np.float32))]
    reference = Reference(Runtime(run, "doubling"), suite)
    first, t_first = reference.output(suite[0].volume)
    again, t_again = reference.output(suite[0].volume)
    assert again is first and t_again == t_first and calls == [id(suite[0].volume)]
    other = np.zeros((1, 1, 2, 2, 2), np.float32)  # not in the suite: never remembered
    reference.output(other)
    reference.output(other)
    assert calls.count(id(other)) == 2 and reference.description == "doubling"


def test_compare_counts_flips_dice_and_gates(tracking) -> None:
    contract = resolve_model(None, tracking.workdir / "c", tracking.name).contract
    rng = np.random.default_rng(0)
    p1 = rng.uniform(0, 1, (1, 1, 10, 10, 10)).astype(np.float32)
    ref = np.concatenate([1 - p1, p1], axis=1)
    cand = ref.copy()
    cand[0, :, 0, 0, 0] = cand[0, ::-1, 0, 0, 0]  # one voxel's label flips (unless a tie)
    case = ParityCase("x", np.zeros((1, 1, 10, 10, 10), np.float32))
    r = compare(case, ref, cand, contract, Tolerances(), (0.0, 0.0))
    assert r.flips == 1 and r.flip_fraction == pytest.approx(1e-3)
    assert r.max_abs == pytest.approx(abs(2 * p1[0, 0, 0, 0, 0] - 1), rel=1e-6)
    assert not r.passed and any("flipped" in f for f in r.failures)
    # a labels-only candidate (a MAP's NIfTI) is compared on masks: identical -> Dice 1, pass
    r = compare(case, ref, ref.argmax(1).astype(np.uint8), contract, Tolerances(), (0.0, 0.0))
    assert r.max_abs is None and r.flips == 0 and r.dice == {"vessel": 1.0} and r.passed
    r = compare(case, ref, ref, contract, Tolerances(min_dice=0.99), (0.0, 0.0))
    assert r.passed and r.max_abs == 0.0


def test_packaged_champion_passes_parity_on_every_suite_shape(packaged) -> None:
    report = packaged.report
    names = [c.name for c in report.cases]
    assert names[:4] == ["odd", "smaller_than_roi", "anisotropic", "batch2"]
    assert any(n.startswith("val:") for n in names), names
    shapes = {c.name: c.shape for c in report.cases}
    roi = packaged.model.contract.roi_size
    assert shapes["batch2"][0] == 2
    assert all(s < r for s, r in zip(shapes["smaller_than_roi"][2:], roi, strict=True))
    assert any(s % 8 for s in shapes["odd"][2:])
    for c in report.cases:
        assert c.passed, c
        assert c.max_abs is not None and c.max_abs <= 1e-4 and c.flip_fraction <= 1e-4
    assert report.passed and "CPUExecutionProvider" in report.candidate


def test_parity_tag_and_report_are_on_the_model_version(packaged, tracking) -> None:
    client = MlflowClient()
    mv = client.get_model_version(tracking.name, packaged.model.version)
    assert mv.tags["parity_onnx"].startswith("pass max_abs=")
    where = mv.tags["parity_onnx_report"]
    local = mlflow.artifacts.download_artifacts(
        f"runs:/{mv.run_id}/{where}/parity_report.json", dst_path=str(tracking.workdir / "dl")
    )
    logged = json.loads(Path(local).read_text())
    assert logged["passed"] and logged["model"]["version"] == packaged.model.version
    assert len(logged["cases"]) == len(packaged.report.cases)


def test_bundle_contents_manifest_and_model_card(packaged) -> None:
    b = packaged.bundle
    manifest = json.loads((b / "manifest.json").read_text())
    for rel, digest in manifest["files"].items():
        assert sha256_file(b / rel) == digest, rel
    assert set(manifest["files"]) >= {
        "model.onnx",
        "contract.json",
        "README.md",
        "parity/parity_report.json",
        "parity/parity_report.md",
        "sample/input.npy",
        "sample/reference.npy",
    }
    m = packaged.model
    assert (
        manifest["model"].items()
        >= {"name": m.name, "version": m.version, "run_id": m.run_id}.items()
    )
    assert manifest["provenance"]["dataset_sha256"] == m.metadata["dataset_sha256"]
    assert {"torch", "onnxruntime", "monai", "mlflow"} <= set(manifest["libraries"])
    assert manifest["contract"] == m.contract.model_dump(mode="json")
    assert manifest["parity"]["passed"] and manifest["precision"] == "fp32"
    # the graph: checked, dynamic batch and spatial axes, contract and provenance embedded
    model = onnx.load(str(b / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", 1, "depth", "height", "width"]
    assert embedded_contract(b / "model.onnx") == m.contract
    props = {p.key: p.value for p in model.metadata_props}
    assert props["run_id"] == m.run_id and props["model_version"] == m.version
    card = (b / "README.md").read_text()
    for section in ("Intended use", "Inputs and outputs", "Training data", "Metrics", "Parity"):
        assert f"## {section}" in card
    assert "95% CI" in card and m.run_id in card


def test_bundle_predicts_like_the_registered_pyfunc(packaged, tracking) -> None:
    volume = np.random.default_rng(1).normal(100, 40, (1, 1, 37, 41, 45)).astype(np.float32)
    pyfunc = mlflow.pyfunc.load_model(f"models:/{tracking.name}@champion")
    want = pyfunc.predict(volume)
    got = load_bundle(packaged.bundle, device="cpu").predict(volume)
    assert got.shape == want.shape == (1, 2, 37, 41, 45)
    assert np.abs(got - want).max() <= 1e-4


def _perturbed_export(monkeypatch) -> None:
    """Fault injection: the exported graph gets one weight changed; PyTorch stays as it was."""
    real = export_onnx

    def export_with_one_weight_changed(network, *args, **kwargs):
        broken = copy.deepcopy(network)
        with torch.no_grad():
            first = next(p for p in broken.parameters() if p.dim() == 5)
            first[0, 0, 1, 1, 1] += 0.5
        return real(broken, *args, **kwargs)

    monkeypatch.setattr(onnx_bundle, "export_onnx", export_with_one_weight_changed)


def test_a_perturbed_model_is_caught_and_no_bundle_is_written(packaged, monkeypatch, tmp_path):
    _perturbed_export(monkeypatch)
    out = tmp_path / "bundles" / "onnx"
    with pytest.raises(ParityError, match="ONNX parity failed .* No bundle was written"):
        build_onnx_bundle(packaged.model, out, device="cpu", validation_limit=0, record=False)
    assert not out.exists()
    assert list((tmp_path / "bundles").iterdir()) == []  # no partial temp folder either


def test_verify_names_a_changed_byte_and_a_swapped_model(packaged, monkeypatch, tmp_path):
    b = tmp_path / "b"
    shutil.copytree(packaged.bundle, b)
    assert verify_bundle(b, device="cpu").passed
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx: sha256 .* differs"):
        verify_bundle(b, device="cpu")
    # a swapped model whose hash was updated too: the sample no longer reproduces
    _perturbed_export(monkeypatch)
    onnx_bundle.export_onnx(
        packaged.model.load_network(), packaged.model.contract, b / "model.onnx"
    )
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["model.onnx"] = sha256_file(b / "model.onnx")
    (b / "manifest.json").write_text(json.dumps(manifest))
    # the first runtime verify checks that reads model.onnx (the default may be OpenVINO)
    swapped = r"runtime (onnxruntime|openvino) no longer reproduces sample/"
    with pytest.raises(ParityError, match=swapped):
        verify_bundle(b, device="cpu")
    (b / "extra.txt").write_text("x")
    (b / "contract.json").unlink()
    with pytest.raises(BundleError) as e:
        verify_bundle(b, device="cpu")
    assert "contract.json: missing" in str(e.value) and "extra.txt: not listed" in str(e.value)


def test_fp16_bundle_is_gated_on_dice(packaged, tmp_path: Path) -> None:
    out, report = build_onnx_bundle(
        packaged.model,
        tmp_path / "fp16",
        precision="fp16",
        device="cpu",
        validation_limit=0,
        record=False,
    )
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16"
    assert report.tolerances == Tolerances(max_abs=None, max_flip_fraction=None, min_dice=0.995)
    assert report.passed and all(min(c.dice.values()) >= 0.995 for c in report.cases)
    assert (out / "model.onnx").stat().st_size < 0.7 * (
        packaged.bundle / "model.onnx"
    ).stat().st_size


def test_execution_provider_choice_and_loud_cuda_failure() -> None:
    import onnxruntime as ort

    if CUDA_EP in ort.get_available_providers():
        assert select_providers("auto")[0] == CUDA_EP
    else:
        assert select_providers("auto") == ["CPUExecutionProvider"]
        with pytest.raises(DeviceError, match="no CUDAExecutionProvider"):
            select_providers("cuda")
    assert select_providers("cpu") == ["CPUExecutionProvider"]


def test_existing_output_is_not_overwritten_without_force(packaged, tmp_path: Path) -> None:
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="already exists and is not empty; pass --force"):
        build_onnx_bundle(packaged.model, out, device="cpu", record=False)
    assert (out / "keep.txt").read_text() == "mine"
