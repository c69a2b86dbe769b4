"""Checks of .ci/containers.sh, run with the host's venv against the real servers it started.

containers_check.py train URL MODEL RUN_ID ARTIFACTS_DIR   the run, its files, its version
containers_check.py wait-checkpoint URL RUN_ID TIMEOUT     until checkpoints/last.pt is logged
containers_check.py finished URL RUN_ID                    the (resumed) run ended FINISHED
containers_check.py segment SERVICE_URL BUNDLE VOLUME      /segment == the ONNX bundle, exactly
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import requests
from mlflow.tracking import MlflowClient


def fail(msg: str) -> int:
    print(f"FAIL: {msg}", file=sys.stderr)
    return 1


def check_train(url: str, model: str, run_id: str, artifacts: str) -> int:
    client = MlflowClient(url)
    run = client.get_run(run_id)
    if run.info.status != "FINISHED":
        return fail(f"run {run_id} is {run.info.status}")
    files = {f.path for f in client.list_artifacts(run_id, "checkpoints")}
    if "checkpoints/last.pt" not in files:
        return fail(f"run {run_id} has no checkpoints/last.pt (has {sorted(files)})")
    on_disk = [p for p in Path(artifacts).rglob("last.pt") if run_id in str(p)]
    if not on_disk:
        return fail(f"last.pt of run {run_id} is not in the server's store {artifacts}")
    mv = client.get_model_version_by_alias(model, "challenger")
    if mv.run_id != run_id:
        return fail(f"{model}@challenger is from run {mv.run_id}, not {run_id}")
    epochs = len(client.get_metric_history(run_id, "train_loss"))
    print(
        f"run {run_id} FINISHED on the server: {epochs} epochs, device "
        f"{run.data.params.get('sys_device')}, {len(files)} checkpoints, artifacts in the "
        f"server's store; registered {model} version {mv.version} @challenger"
    )
    return 0


def wait_checkpoint(url: str, run_id: str, timeout: str) -> int:
    client, deadline = MlflowClient(url), time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        if any(
            f.path == "checkpoints/last.pt" for f in client.list_artifacts(run_id, "checkpoints")
        ):
            print(f"run {run_id} has logged checkpoints/last.pt")
            return 0
        time.sleep(2)
    return fail(f"run {run_id} logged no last.pt in {timeout} s")


def running_run(url: str, experiment: str, timeout: str) -> int:
    """Print the id of the experiment's RUNNING run (the one a container is training)."""
    client, deadline = MlflowClient(url), time.monotonic() + float(timeout)
    while time.monotonic() < deadline:
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
            if runs:
                print(runs[0].info.run_id)
                return 0
        time.sleep(2)
    return fail(f"no RUNNING run in experiment {experiment} after {timeout} s")


def finished(url: str, run_id: str) -> int:
    run = MlflowClient(url).get_run(run_id)
    if run.info.status != "FINISHED":
        return fail(f"run {run_id} is {run.info.status} after the resume")
    print(f"run {run_id} FINISHED after the resume")
    return 0


def segment(service: str, bundle: str, volume: str) -> int:
    from clinbundle.packaging.onnx_bundle import load_bundle

    with open(volume, "rb") as f:
        r = requests.post(f"{service}/segment", files={"file": (Path(volume).name, f)}, timeout=300)
    if r.status_code != 200:
        return fail(f"/segment answered {r.status_code}: {r.text[:500]}")
    out = Path(volume).with_name("served-labels.nii.gz")
    out.write_bytes(r.content)
    served = nib.load(out)
    image = nib.load(volume)
    raw = np.asarray(image.dataobj, dtype=np.float32)
    expected = load_bundle(Path(bundle), device="cpu").predict(raw[None, None])[0].argmax(0)
    got = np.asarray(served.dataobj)
    if got.dtype != np.uint8 or got.shape != expected.shape:
        return fail(f"served labels {got.dtype} {got.shape}, expected uint8 {expected.shape}")
    if not np.allclose(served.affine, image.affine):
        return fail("the served labels lost the input's affine")
    differ = int((got != expected).sum())
    if differ:
        return fail(f"{differ} of {got.size} labels differ from the ONNX bundle's")
    meta = requests.get(f"{service}/metadata", timeout=30).json()
    print(
        f"/segment on {Path(volume).name} {raw.shape}: all {got.size} labels equal the ONNX "
        f"bundle's ({int(got.sum())} foreground); service metadata: {meta.get('model', meta)!s:.200}"
    )
    return 0


def main(argv: list[str]) -> int:
    commands = {
        "train": check_train,
        "wait-checkpoint": wait_checkpoint,
        "running-run": running_run,
        "finished": finished,
        "segment": segment,
    }
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
