"""Checks of .ci/containers.sh, run with the host's venv against the real servers it started.

containers_check.py train URL MODEL RUN_ID ARTIFACTS_DIR   the run, its files, its version
containers_check.py wait-checkpoint URL RUN_ID TIMEOUT     until checkpoints/last.pt is logged
containers_check.py interrupted URL RUN_ID                 SIGTERM ended the run KILLED, `last` kept
containers_check.py finished URL MODEL RUN_ID EPOCHS WORLD the run ended FINISHED, nothing lost
containers_check.py segment SERVICE_URL BUNDLE VOLUME      /segment == the ONNX bundle, exactly
    (with CLINBUNDLE_API_TOKEN set: 401 without it, the requests send it)
containers_check.py map OUT_DIR BUNDLE VOLUME              the MAP's NIfTI == the ONNX bundle, exactly
"""

from __future__ import annotations

import os
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


def has_last(client: MlflowClient, run_id: str) -> bool:
    return any(
        f.path == "checkpoints/last.pt" for f in client.list_artifacts(run_id, "checkpoints")
    )


def bundle_labels(bundle: str, volume: str) -> tuple[np.ndarray, nib.Nifti1Image]:
    """What the ONNX bundle answers for a NIfTI volume: the reference every container matches."""
    from clinbundle.runtime.bundle_reader import load_bundle

    image = nib.load(volume)
    raw = np.asarray(image.dataobj, dtype=np.float32)
    bundle_ = load_bundle(Path(bundle), device="cpu")
    return bundle_.predict(raw[None, None], image.affine, "labels")[0], image


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
        if has_last(client, run_id):
            print(f"run {run_id} has logged checkpoints/last.pt")
            return 0
        time.sleep(0.5)
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


def interrupted(url: str, run_id: str) -> int:
    run = MlflowClient(url).get_run(run_id)
    tags = run.data.tags
    if run.info.status != "KILLED" or tags.get("clinbundle.status") != "interrupted":
        return fail(f"run {run_id} is {run.info.status} / {tags.get('clinbundle.status')}")
    print(
        f"run {run_id} ended KILLED, tagged interrupted ({tags.get('clinbundle.status_reason')}), "
        f"last checkpoint {tags.get('clinbundle.last_checkpoint')}"
    )
    return 0


def finished(url: str, model: str, run_id: str, epochs: str, world_size: str = "1") -> int:
    """FINISHED, every epoch's metrics on the server exactly once, one version, `last` kept."""
    client = MlflowClient(url)
    run = client.get_run(run_id)
    tags = run.data.tags
    if run.info.status != "FINISHED" or tags.get("clinbundle.status") != "finished":
        return fail(f"run {run_id} is {run.info.status} / {tags.get('clinbundle.status')}")
    want = list(range(1, int(epochs) + 1))
    for key in ("train_loss", "val_loss", "dice"):
        steps = sorted(m.step for m in client.get_metric_history(run_id, key))
        if steps != want:
            return fail(f"run {run_id}: {key} at steps {steps}, expected each of {want} once")
    if run.data.params.get("train_world_size", "1") != world_size:
        return fail(f"run {run_id} trained on {run.data.params.get('train_world_size')} processes")
    versions = [
        v.version for v in client.search_model_versions(f"name='{model}'") if v.run_id == run_id
    ]
    if len(versions) != 1:
        return fail(f"run {run_id} registered {len(versions)} versions of {model}: {versions}")
    if not has_last(client, run_id):
        return fail(f"run {run_id} has no checkpoints/last.pt")
    print(
        f"run {run_id} FINISHED ({tags.get('clinbundle.resumes', '0')} resume(s), "
        f"{world_size} process(es)): train_loss, val_loss, dice at epochs 1..{epochs} exactly once; "
        f"one version ({model} v{versions[0]})"
    )
    return 0


def segment(service: str, bundle: str, volume: str) -> int:
    token = os.environ.get("CLINBUNDLE_API_TOKEN")
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    upload = {"file": ("volume.nii.gz", Path(volume).read_bytes())}
    if token:  # the token the container was started with is really required
        r = requests.post(f"{service}/segment", files=upload, timeout=300)
        if r.status_code != 401:
            return fail(f"/segment without the token answered {r.status_code}, not 401")
    r = requests.post(f"{service}/segment", files=upload, headers=auth, timeout=300)
    if r.status_code != 200:
        return fail(f"/segment answered {r.status_code}: {r.text[:500]}")
    out = Path(volume).with_name("served-labels.nii.gz")
    out.write_bytes(r.content)
    served = nib.load(out)
    expected, image = bundle_labels(bundle, volume)
    got = np.asarray(served.dataobj)
    if got.dtype != np.uint8 or got.shape != expected.shape:
        return fail(f"served labels {got.dtype} {got.shape}, expected uint8 {expected.shape}")
    if not np.allclose(served.affine, image.affine):
        return fail("the served labels lost the input's affine")
    differ = int((got != expected).sum())
    if differ:
        return fail(f"{differ} of {got.size} labels differ from the ONNX bundle's")
    meta = requests.get(f"{service}/metadata", headers=auth, timeout=30).json()
    print(
        f"/segment on {Path(volume).name} {image.shape}: all {got.size} labels equal the ONNX "
        f"bundle's ({int(got.sum())} foreground); service metadata: {meta.get('model', meta)!s:.200}"
    )
    return 0


def map_output(out_dir: str, bundle: str, volume: str) -> int:
    out = Path(out_dir)
    name = Path(volume).name.removesuffix(".nii.gz")
    produced = sorted(p.name for p in out.iterdir())
    if produced != [f"{name}_seg.nii.gz"]:
        return fail(f"the MAP wrote {produced} to {out}, expected [{name}_seg.nii.gz]")
    expected, image = bundle_labels(bundle, volume)
    got = np.asarray(nib.load(out / produced[0]).dataobj)
    if got.shape != expected.shape:
        return fail(f"the MAP's labels are {got.shape}, expected {expected.shape}")
    differ = int((got != expected).sum())
    if differ:
        return fail(f"{differ} of {got.size} MAP labels differ from the ONNX bundle's")
    print(
        f"MAP on {Path(volume).name} {image.shape}: all {got.size} labels equal the ONNX bundle's"
    )
    return 0


def main(argv: list[str]) -> int:
    commands = {
        "train": check_train,
        "wait-checkpoint": wait_checkpoint,
        "running-run": running_run,
        "interrupted": interrupted,
        "finished": finished,
        "segment": segment,
        "map": map_output,
    }
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    return commands[argv[0]](*argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
