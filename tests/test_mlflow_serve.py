"""`mlflow models serve` of the registered champion (issue 18): MLflow's own server answers
/invocations like the pyfunc in this process, and a bad body with a 4xx."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest

from clinbundle.packaging.bento import free_port, stop_process_group
from clinbundle.training.synth import synthesize_volume


@pytest.mark.slow
def test_mlflow_models_serve_answers_like_the_pyfunc_and_4xx_on_bad_bodies(tracking) -> None:
    uri = f"models:/{tracking.name}@champion"
    port = free_port()
    bin_dir = str(Path(sys.executable).parent)  # offline: the venv's own mlflow and python
    env = os.environ | {
        "MLFLOW_TRACKING_URI": tracking.tracking_uri,
        "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
    }
    log = tracking.workdir / f"mlflow-serve-{port}.log"
    cmd = [f"{bin_dir}/mlflow", "models", "serve", "-m", uri, "--env-manager", "local"]
    proc = subprocess.Popen(
        [*cmd, "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        env=env,
        stdout=open(log, "wb"),  # noqa: SIM115 (lives as long as the server)
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            try:
                if httpx.get(url + "/ping", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)

        image = synthesize_volume((20, 24, 28), np.random.default_rng(4))[0]
        x = image[None, None].astype(np.float32)
        r = httpx.post(url + "/invocations", json={"inputs": x.tolist()}, timeout=300)
        assert r.status_code == 200, r.text[:2000]
        served = np.asarray(r.json()["predictions"], dtype=np.float32)
        expected = mlflow.pyfunc.load_model(uri).predict(x)
        assert served.shape == expected.shape == (1, 2, 20, 24, 28)
        assert float(np.abs(served - expected).max()) <= 1e-5

        bad = [
            b"{not json",
            b'{"inputs": "a volume"}',
            b'{"unknown_key": [1, 2, 3]}',
            json.dumps({"inputs": np.zeros((1, 2, 8, 8, 8)).tolist()}).encode(),  # 2 channels
        ]
        for body in bad:
            r = httpx.post(
                url + "/invocations",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            assert 400 <= r.status_code < 500, (body[:40], r.status_code, r.text[:500])
        assert httpx.get(url + "/ping", timeout=5).status_code == 200
    finally:
        stop_process_group(proc)
