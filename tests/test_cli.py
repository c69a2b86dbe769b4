"""The `clinbundle` command as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import hashlib
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import pytest

CLI = [sys.executable, "-m", "clinbundle"]


def clean_env() -> dict[str, str]:
    """The environment without MLflow URIs: mlflow.set_*_uri in earlier tests exports them."""
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    return {k: v for k, v in os.environ.items() if k not in drop}


#: Warnings of libraries that no command but a MAP's concerns (issue 18): holoscan's stack
#: warning and the MAP SDK's nvImageCodec decoder.
NOT_OURS = re.compile(r"Current stack size|holoscan|nvimgcodec", re.IGNORECASE)


def _default_stack() -> None:
    """A user's shell's 8 MiB stack (lower than holoscan wants), whatever pytest's shell has."""
    _, hard = resource.getrlimit(resource.RLIMIT_STACK)
    want = 8 * 1024 * 1024 if hard == resource.RLIM_INFINITY else min(8 * 1024 * 1024, hard)
    resource.setrlimit(resource.RLIMIT_STACK, (want, hard))


def run(args: list[str], cwd: Path, env: dict | None = None, timeout: int = 900):
    env = clean_env() | (env or {})
    return subprocess.run(
        CLI + args,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_default_stack,
    )


def assert_quiet(stderr: str) -> None:
    assert not NOT_OURS.search(stderr), NOT_OURS.search(stderr).string[-3000:]


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
        (
            ["package", "monai-bundle", "--model", "models:/nobody@champion", "--out", "b"],
            "no registered model named 'nobody'",
        ),
        (
            ["package", "monai-bundle", "--out", "b", "--sign-key", "k.pem"],
            "--sign-key is not supported for a MONAI bundle",
        ),
        (["train", "--data", ".", "--folds", "first"], "--folds takes 'all' or fold numbers"),
        (["evaluate", "no-such-run"], "no MLflow run 'no-such-run'"),
    ],
)
def test_user_errors_are_one_message_no_traceback(tmp_path: Path, args, needle) -> None:
    r = run([*args, "--workdir", str(tmp_path)], tmp_path)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert not (tmp_path / "b").exists()
    assert_quiet(r.stderr)  # `package` and `verify` import MONAI, and with it no MAP SDK


README = Path(__file__).resolve().parents[1] / "README.md"
README_PATH_MARK = "<!-- readme-path:"


def readme_path_commands() -> list[str]:
    """The commands of the README's tested block, `\\` continuations joined, comments dropped."""
    text = README.read_text()
    block = text[text.index(README_PATH_MARK) :].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = block.replace("\\\n", " ").splitlines()
    return [c.strip() for c in commands if c.strip() and not c.strip().startswith("#")]


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited with {proc.returncode} before {url} answered"
        try:
            if urllib.request.urlopen(url, timeout=5).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"{url} did not answer in {timeout} s")


def stop_group(proc: subprocess.Popen) -> None:
    import signal

    try:  # the whole group: a server started in the background outlives its shell
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def run_readme_path(cwd: Path) -> None:
    """Issue 18.6: the README's path, as a newcomer pastes it (ports made free), from a folder
    whose `.venv` is this interpreter's and whose `work/` is the quickstart's."""
    from clinbundle.packaging.bento import free_port

    ports = {"3000": str(free_port()), "7860": str(free_port())}
    commands = [
        re.sub(r"\b(3000|7860)\b", lambda m: ports[m[1]], c) for c in readme_path_commands()
    ]
    (cwd / ".venv").symlink_to(sys.prefix)
    demo = [c for c in commands if c.startswith("clinbundle demo")]
    assert len(demo) == 1 and commands[-1] == demo[0], commands
    script = "set -eo pipefail\n" + "\n".join(commands[:-1]) + "\n"
    proc = subprocess.Popen(
        ["bash", "-c", script], cwd=cwd, env=clean_env(), start_new_session=True, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        out, _ = proc.communicate(timeout=1500)
    finally:
        stop_group(proc)
    assert proc.returncode == 0, out[-5000:]
    activate = next(c for c in commands if c.startswith(". "))
    demo_proc = subprocess.Popen(
        ["bash", "-c", f"{activate} && exec {demo[0]}"], cwd=cwd, env=clean_env(),
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{ports['7860']}/", demo_proc)
    finally:
        stop_group(demo_proc)


def assert_same_labels(work: Path) -> None:
    """What the README's path wrote over HTTP, by the MAP and by the MONAI bundle is what the
    ONNX bundle answers for that scan (parity tolerance: flips <= 1e-4)."""
    import nibabel as nib
    import numpy as np

    from clinbundle.runtime.bundle_reader import load_bundle

    scan = work / "data" / "synthetic-vessels" / "imagesTs" / "vessel_t000.nii.gz"
    img = nib.load(scan)
    volume = np.asarray(img.dataobj, dtype=np.float32)[None, None]
    expected = load_bundle(work / "bundles" / "vessel-seg-onnx", "cpu").predict(
        volume, img.affine, "labels"
    )[0]
    assert expected.any(), "the champion found no vessel in a held-out scan"
    for out in ("vessel_t000_seg.nii.gz", "results-map/vessel_t000_seg.nii.gz",
                "results-monai/vessel_t000_seg.nii.gz"):  # fmt: skip
        labels = np.asarray(nib.load(work / out).dataobj)
        assert labels.shape == expected.shape, out
        assert (labels != expected).mean() <= 1e-4, out


@pytest.mark.slow
@pytest.mark.timeout(3600)  # training, four formats with their parity runs, then the path
def test_quickstart_packages_every_format_and_the_readme_path_runs(tmp_path: Path) -> None:
    r = run(["quickstart", "--package", "--workdir", "work"], tmp_path, timeout=2400)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_quiet(r.stderr)
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "models:/vessel-seg@champion"
    dice = float(re.search(r"held-out Dice of version \d+: ([0-9.]+)", r.stdout).group(1))
    assert dice >= 0.7, r.stdout
    # issue 18.5: every format, each parity-checked, with the command that runs it
    made = re.findall(r"^  (.+?): \S+ \(\d+ s; parity pass ", r.stdout, re.MULTILINE)
    assert made == ["ONNX bundle", "MONAI bundle", "bento", "MAP"], r.stdout  # in making order
    # no library's log lines on stdout (MONAI's verify input summaries, "File exists ...")
    assert not [x for x in lines if re.match(r"\d{4}-\d\d-\d\d ", x)], r.stdout
    for command in ("clinbundle verify", "clinbundle serve", "clinbundle run-map",
                    "python -m monai.bundle run", "clinbundle demo"):  # fmt: skip
        assert f"$ {command} " in r.stdout, r.stdout
    # everything stayed in the work dir, and a fresh process finds the champion there
    work = tmp_path / "work"
    assert (work / "mlflow.db").exists() and (work / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    code = (
        "import mlflow, numpy as np; "
        f"mlflow.set_tracking_uri('sqlite:///{work / 'mlflow.db'}'); "
        "m = mlflow.pyfunc.load_model('models:/vessel-seg@champion'); "
        "print(m.predict(np.zeros((1, 1, 50, 60, 70), np.float32)).shape); "
        "mv = mlflow.MlflowClient().get_model_version_by_alias('vessel-seg', 'champion'); "
        "print(*(mv.tags[f'parity_{f}'] for f in ('onnx', 'bento', 'map', 'monai_bundle')), "
        "sep='\\n')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=clean_env()
    )
    shown = out.stdout.splitlines()
    assert shown[0] == "(1, 2, 50, 60, 70)", out.stderr[-2000:]
    assert len(shown) == 5 and all(s.startswith("pass max_abs=") for s in shown[1:]), shown
    # issue 18.6: the README's path on this champion
    run_readme_path(tmp_path)
    assert_same_labels(work)


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
