"""A finished run's MLflow page (issue 18): system metrics, the data set as an input, a model
summary, git state, and a validation overlay per validated epoch, on the session's tiny run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
from mlflow.tracking import MlflowClient
from PIL import Image

from clinbundle.provenance import git_state
from clinbundle.training.run_page import DIGEST_CHARS, OVERLAY_KEY, overlay


def test_a_finished_run_has_system_metrics_dataset_summary_and_git_state(tracking) -> None:
    run = MlflowClient().get_run(tracking.run_id)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system

    (inp,) = run.inputs.dataset_inputs
    sha = tracking.state.dataset.sha256
    assert len(sha) == 64 and inp.dataset.digest == sha[:DIGEST_CHARS]
    tags = {t.key: t.value for t in inp.tags}
    assert tags["sha256"] == sha and tags["mlflow.data.context"] == "training"
    assert inp.dataset.source_type == "local" and str(tracking.data) in inp.dataset.source

    summary = mlflow.artifacts.load_text(f"runs:/{tracking.run_id}/model_summary.txt")
    total = int(re.search(r"Total params: ([\d,]+)", summary).group(1).replace(",", ""))
    assert total == tracking.state.num_parameters and "DynUNet" in summary

    repo = Path(__file__).resolve().parents[1]
    branch = subprocess.run(
        ["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=repo, capture_output=True, text=True
    ).stdout.strip()
    assert run.data.tags["git_branch"] == branch == git_state()["git_branch"]
    assert run.data.tags["git_dirty"] in ("true", "false")


def test_each_validated_epoch_has_an_overlay_of_the_first_val_case(tracking, tmp_path) -> None:
    state = tracking.state
    validated = [int(h["epoch"]) for h in state.history if "dice" in h]
    client = MlflowClient()
    images = [a.path for a in client.list_artifacts(tracking.run_id, "images")]
    steps = sorted(
        int(m.group(1))
        for p in images
        if (m := re.search(rf"{OVERLAY_KEY}\+step\+(\d+)\+.*\.png$", p)) and "compressed" not in p
    )
    assert steps == validated and len(validated) >= 2, images

    # the last one is exactly the overlay of the last validation's prediction of that case
    last = next(p for p in images if f"+step+{validated[-1]}+" in p and "compressed" not in p)
    logged = np.asarray(Image.open(client.download_artifacts(tracking.run_id, last, tmp_path)))
    pair = state.split["val"][0]
    image, truth = (np.asarray(nib.load(pair[k]).dataobj) for k in ("image", "label"))
    with np.load(state.out_dir / "val_predictions" / f"{pair['case']}.npz") as z:
        expected = overlay(image, z["labels"], truth)
    assert logged.shape == expected.shape and expected.shape[1] > 3 * 256
    assert np.array_equal(logged, expected)


def test_a_packaged_version_has_parity_plots_in_bundle_card_and_run(packaged, tracking) -> None:
    from clinbundle.packaging.parity_plots import FLIP_MAP_PNG, HISTOGRAM_PNG

    report, k = packaged.report, packaged.model.contract.num_classes
    for c in report.cases:  # the plots' numbers are the comparison's, every value counted once
        n, _, d, h, w = c.shape
        assert sum(c.diff_histogram) == n * k * d * h * w
        assert c.flip_map.shape == (d, h) and int(c.flip_map.sum()) == c.flips
    bundle = packaged.bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    card = (bundle / "README.md").read_text()
    for name in (HISTOGRAM_PNG, FLIP_MAP_PNG):
        png = Image.open(bundle / "parity" / name)
        assert png.format == "PNG" and min(png.size) >= 200
        assert f"parity/{name}" in manifest["files"] and f"](parity/{name})" in card
    t = packaged.trained
    where = f"parity/onnx/v{packaged.model.version}"
    logged = {Path(a.path).name for a in MlflowClient().list_artifacts(t.run_id, where)}
    assert {HISTOGRAM_PNG, FLIP_MAP_PNG} <= logged, logged
