"""The `clinbundle` command as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "clinbundle"]


def clean_env() -> dict[str, str]:
    """The environment without MLflow URIs: mlflow.set_*_uri in earlier tests exports them."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    return {k: v for k, v in os.environ.items() if k not in drop}


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900):
    env = clean_env() | (env or {})
    return subprocess.run(
        CLI + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


def test_synth_same_seed_same_bytes(tmp_path: Path) -> None:
    for out in ("a", "b"):
        r = run(
            [
                "data",
                "synth",
                "--out",
                out,
                "--n",
                "2",
                "--n-test",
                "1",
                "--shape",
                "24",
                "24",
                "32",
            ],
            tmp_path,
        )
        assert r.returncode == 0, r.stderr
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["train", "--data", "missing-folder"], "does not exist"),
        (["train", "--data", ".", "--set", "train.epochs=oops"], "train.epochs"),
        (["promote", "--model", "nobody", "--data", "."], "no registered model 'nobody'"),
        (
            ["package", "onnx", "--model", "models:/nobody@champion", "--out", "b"],
            "no registered model named 'nobody'",
        ),
        (["verify", "no-such-bundle"], "is not a folder"),
        (["train", "--data", ".", "--folds", "first"], "--folds takes 'all' or fold numbers"),
        (["evaluate", "no-such-run"], "no MLflow run 'no-such-run'"),
    ],
)
def test_user_errors_are_one_message_no_traceback(tmp_path: Path, args, needle) -> None:
    r = run([*args, "--workdir", str(tmp_path)], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_quickstart_learns_and_prints_the_champion_uri(tmp_path: Path) -> None:
    r = run(["quickstart", "--workdir", str(tmp_path / "qs")], tmp_path, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "models:/vessel-seg@champion"
    dice = float(re.search(r"held-out Dice of version \d+: ([0-9.]+)", r.stdout).group(1))
    assert dice >= 0.7, r.stdout
    # everything stayed in the work dir, and a fresh process finds the champion there
    assert (tmp_path / "qs" / "mlflow.db").exists() and (tmp_path / "qs" / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    code = (
        "import mlflow, numpy as np; "
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'qs' / 'mlflow.db'}'); "
        "m = mlflow.pyfunc.load_model('models:/vessel-seg@champion'); "
        "print(m.predict(np.zeros((1, 1, 50, 60, 70), np.float32)).shape)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=clean_env()
    )
    assert "(1, 2, 50, 60, 70)" in out.stdout, out.stderr[-2000:]

    # issue 4: the quickstart champion becomes a verified ONNX bundle, parity recorded in MLflow
    wd = ["--workdir", str(tmp_path / "qs")]
    r = run(["package", "onnx", "--out", "bundle", *wd], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.strip().splitlines()[-1] == str(tmp_path / "bundle")
    assert "parity: pass" in r.stdout
    r = run(["verify", "bundle"], tmp_path)
    assert r.returncode == 0 and "all files match manifest.json" in r.stdout, r.stderr[-2000:]
    code = (
        "import mlflow; "
        f"mlflow.set_tracking_uri('sqlite:///{tmp_path / 'qs' / 'mlflow.db'}'); "
        "mv = mlflow.MlflowClient().get_model_version_by_alias('vessel-seg', 'champion'); "
        "print(mv.tags['parity_onnx'])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=clean_env()
    )
    assert out.stdout.startswith("pass max_abs="), out.stderr[-2000:]


def test_synth_bad_arguments_and_file_as_data_folder(tmp_path: Path) -> None:
    r = run(["data", "synth", "--out", "x", "--shape", "8", "8", "8"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr and ">= 16" in r.stderr, r.stderr
    (tmp_path / "notes.txt").write_text("hi")
    r = run(["train", "--data", "notes.txt", "--workdir", str(tmp_path / "w")], tmp_path)
    assert r.returncode == 2 and "is a file" in r.stderr, r.stderr
    assert not (tmp_path / "w" / "mlflow.db").exists()  # nothing written before the data check


def test_serve_off_loopback_without_a_token_exits_2_before_starting(tmp_path: Path) -> None:
    """The check comes first: the bento need not exist, no server (nor BentoML) is started."""
    env = {k: v for k, v in clean_env().items() if k != "CLINBUNDLE_API_TOKEN"}
    r = subprocess.run(
        [*CLI, "serve", str(tmp_path / "none.bento"), "--host", "0.0.0.0", "--port", "1"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "refusing to serve on 0.0.0.0" in r.stderr and "CLINBUNDLE_API_TOKEN" in r.stderr
    assert "--insecure-no-auth" in r.stderr and "Traceback" not in r.stderr
    assert "serving" not in r.stdout


def test_serve_auth_decision(caplog) -> None:
    from clinbundle.cli import check_serve_auth
    from clinbundle.runtime.errors import ClinbundleError

    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        check_serve_auth(host, None, insecure_no_auth=False)
    for host in ("0.0.0.0", "::", "10.0.0.5", "example.org"):
        check_serve_auth(host, "a-token", insecure_no_auth=False)
        with pytest.raises(ClinbundleError, match="refusing to serve"):
            check_serve_auth(host, None, insecure_no_auth=False)
        with pytest.raises(ClinbundleError):
            check_serve_auth(host, "", insecure_no_auth=False)
    assert not caplog.records
    with caplog.at_level("WARNING", logger="clinbundle.serve"):
        check_serve_auth("0.0.0.0", None, insecure_no_auth=True)
    (record,) = caplog.records
    assert record.levelname == "WARNING" and "NO authentication" in record.getMessage()
