"""The one command line: `clinbundle <command>`.

User errors (`ClinbundleError`) print one message and exit non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from pathlib import Path

from clinbundle.cli_help import add_examples, extra_of, missing_extra, require_extras, version_text
from clinbundle.runtime.errors import ClinbundleError, Preempted


def _workdir(args: argparse.Namespace) -> Path:
    return Path(args.workdir).resolve()


def _keep_inside(workdir: Path) -> None:
    """Caches and temp files of the libraries go into the work dir, not the user's home."""
    for var, sub in (("MLFLOW_ENV_ROOT", "cache/mlflow-envs"), ("BENTOML_HOME", "bentoml")):
        os.environ.setdefault(var, str(workdir / sub))
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in logs


def cmd_synth(args: argparse.Namespace) -> int:
    from clinbundle.training.synth import write_dataset

    try:
        path = write_dataset(
            Path(args.out),
            n=args.n,
            shape=tuple(args.shape),
            seed=args.seed,
            n_test=args.n_test,
            mixed_geometry=args.mixed_geometry,
        )
    except (ValueError, FileExistsError) as e:
        raise ClinbundleError(str(e)) from None
    print(path)
    return 0


def _under_torchrun(nproc: int, argv: list[str]) -> int:
    """Run this same command under torchrun with `nproc` processes on this machine.

    SIGTERM/SIGINT are passed on to torchrun, which passes them to every rank (each saves
    nothing but rank 0's `last`, after the step in progress). Returns torchrun's exit code.
    """
    import signal
    import subprocess

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        "-m",
        "clinbundle",
        *argv,
    ]
    logging.getLogger("clinbundle").info("re-running under torchrun: %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _strip_nproc(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def cmd_add_corrections(args: argparse.Namespace) -> int:
    from clinbundle.training.corrections import add_corrections

    report = add_corrections(Path(args.table), Path(args.labels), Path(args.data))
    print(report.summary(Path(args.data)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from clinbundle.training.run import run_training

    if args.nproc is not None:
        if args.nproc < 1:
            raise ClinbundleError(f"--nproc must be >= 1, got {args.nproc}")
        if "WORLD_SIZE" in os.environ:
            raise ClinbundleError("--nproc under torchrun: drop one of them")
        return _under_torchrun(args.nproc, _strip_nproc(args.argv))
    wd = _workdir(args)
    overrides = list(args.set or []) + (["train.production=true"] if args.production else [])
    if args.address and args.engine != "ray":
        raise ClinbundleError("--address is the Ray cluster of --engine ray; add --engine ray")
    if args.tracking_uri:
        overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
    data = Path(args.data).resolve() if args.data else None
    if args.folds is not None or _is_grid(overrides):
        return _train_grid(args, wd, overrides, data)
    if args.engine == "ray":
        raise ClinbundleError("--engine ray runs a grid: add --folds or a --set KEY=a,b sweep")
    if args.resume:
        state = run_training(wd, None, overrides, data_root=data, resume=args.resume)
    else:
        if data is not None:
            overrides.insert(0, f"data.root={data}")
        state = run_training(wd, Path(args.config) if args.config else None, overrides)
    if "run_id" not in state.extra:  # a rank other than 0 under torchrun
        return 0
    print(f"run {state.extra.get('run_id')}: best {state.best}")
    if "model_version" in state.extra:
        print(f"models:/{state.config.tracking.model_name}/{state.extra['model_version']}")
    return 0


def _is_grid(overrides: list[str]) -> bool:
    from clinbundle.training.grid import sweeps

    return bool(sweeps(overrides)[1])


def _train_grid(args: argparse.Namespace, wd: Path, overrides: list[str], data: Path | None) -> int:
    from clinbundle.training.grid import run_grid

    if args.resume or args.nproc:
        raise ClinbundleError("a grid (--folds / --set key=a,b) trains without --resume/--nproc")
    if data is not None:
        overrides.insert(0, f"data.root={data}")
    ray = None
    if args.engine == "ray":
        from clinbundle.training.grid import RayGrid
        from clinbundle.training.ray_grid import TrialResources

        if args.trial_cpus <= 0 or (args.trial_gpus is not None and args.trial_gpus < 0):
            raise ClinbundleError("--trial-cpus must be > 0 and --trial-gpus >= 0")
        ray = RayGrid(args.address, TrialResources(args.trial_cpus, args.trial_gpus))
    parent, results = run_grid(
        wd, Path(args.config) if args.config else None, overrides, args.folds, ray
    )
    for r in results:
        print(f"trial {r['trial']}: run {r['run_id']} version {r['model_version']}")
    print(f"grid {parent}")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from clinbundle.registry import promote
    from clinbundle.tracking import configure_tracking

    configure_tracking(_workdir(args))
    rules = {"min_volumes": args.min_volumes} if args.min_volumes is not None else {}
    d = promote(
        args.model, Path(args.data), args.metric, args.minimum, args.min_improvement, **rules
    )
    print(d.reason)
    print(f"decision: {'promoted' if d.promoted else 'not promoted'}")
    return 0


def cmd_ensemble(args: argparse.Namespace) -> int:
    from clinbundle.ensemble import build_ensemble
    from clinbundle.tracking import configure_tracking

    wd = _workdir(args)
    configure_tracking(wd)
    e = build_ensemble(args.sources, wd / "cache" / "models", args.name, args.mirror_axes)
    spec = e.contract.network.ensemble
    print(f"run {e.run_id}: {len(e.members)} members, {spec.forward_passes} forward passes a patch")
    print(f"models:/{e.name}/{e.version}")
    return 0


def _load_metrics_module(name: str | None) -> None:
    """Import a module that registers custom metrics (clinbundle.metric_definitions.register)."""
    import importlib

    if name is None:
        return
    try:
        importlib.import_module(name)
    except ImportError as e:
        raise ClinbundleError(f"--metrics-module {name} cannot be imported: {e}") from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from clinbundle.analysis.evaluate import evaluate_run, recompute_from_predictions
    from clinbundle.metric_definitions import get
    from clinbundle.tracking import configure_tracking

    configure_tracking(_workdir(args))
    _load_metrics_module(args.metrics_module)
    data = Path(args.data).resolve() if args.data else None
    if args.from_predictions:
        evals = recompute_from_predictions(args.run, data)
    else:
        which = args.checkpoints.split(",") if args.checkpoints else None
        evals = evaluate_run(args.run, data, which, args.device)
    for ev in evals:
        shown = ", ".join(f"{k} {i.text(get(k).fmt)}" for k, i in ev.intervals.items())
        print(f"{ev.upstream_run_id} {','.join(ev.checkpoints)} -> run {ev.run_id}: {shown}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from clinbundle.analysis.compare import compare_grid
    from clinbundle.tracking import configure_tracking

    configure_tracking(_workdir(args))
    _load_metrics_module(args.metrics_module)
    cmp = compare_grid(args.grid, args.metric)
    for t in cmp.tests:
        d = t.difference
        print(f"{t.metric}: {t.a} vs {t.b}: {d.mean:+.4f} ({d.low:.4f}..{d.high:.4f}) {t.verdict}")
    for alias, version in cmp.aliases.items():
        print(f"@{alias} -> {version}")
    print(f"report: runs:/{args.grid}/compare/report.md")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from clinbundle.quickstart import run_quickstart

    uri = run_quickstart(_workdir(args), args.set, min_dice=args.min_dice, package=args.package)
    print(uri)
    return 0


def _resolve(args: argparse.Namespace):
    from clinbundle.packaging.model_source import resolve_model
    from clinbundle.tracking import configure_tracking

    wd = _workdir(args)
    configure_tracking(wd)
    return resolve_model(args.model, wd / "cache" / "models", default_name=args.name)


def _tolerances(args: argparse.Namespace):
    """The precision's defaults, with each tolerance given on the command line replacing one."""
    import dataclasses

    from clinbundle.packaging.parity import Tolerances

    base = Tolerances.for_precision("fp16" if getattr(args, "fp16", False) else "fp32")
    # a bf16 bundle's gate is its fp32 graph; the bf16 candidate has its own (--bf16-max-abs)
    given = {
        "max_abs": args.max_abs,
        "max_flip_fraction": args.max_flips,
        "min_dice": args.min_dice,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def _runtime_options(args: argparse.Namespace):
    """Runtime candidates at packaging (see clinbundle.packaging.runtime_candidates)."""
    import dataclasses

    from clinbundle.packaging.onnx_bundle import RuntimeOptions
    from clinbundle.packaging.runtime_candidates import BF16_TOLERANCES

    bf16 = BF16_TOLERANCES
    if args.bf16_max_abs is not None:
        bf16 = dataclasses.replace(bf16, max_abs=args.bf16_max_abs)
    shape = tuple(args.bench_shape) if args.bench_shape else None
    if shape is not None and min(shape) < 1:
        raise ClinbundleError(f"--bench-shape {list(shape)}: sizes must be >= 1")
    from clinbundle.packaging.onnx_bundle import package_runtimes_default

    try:
        which = args.runtimes or package_runtimes_default()
    except ValueError as e:
        raise ClinbundleError(str(e)) from None
    return RuntimeOptions(which == "all", args.threads, shape, bf16)


def cmd_package_onnx(args: argparse.Namespace) -> int:
    from clinbundle.packaging.onnx_bundle import build_onnx_bundle

    model = _resolve(args)
    out, report = build_onnx_bundle(
        model,
        Path(args.out),
        precision="fp16" if args.fp16 else "bf16" if args.bf16 else "fp32",
        device=args.device,
        tolerances=_tolerances(args),
        exporter=args.exporter,
        validation_limit=args.validation_volumes,
        force=args.force,
        sign_key=_sign_key(args),
        runtimes=_runtime_options(args),
    )
    print(f"parity: {report.summary()}")
    print(out.resolve())
    return 0


def _sign_key(args: argparse.Namespace) -> Path | None:
    """--sign-key, checked before any packaging work starts."""
    if not args.sign_key:
        return None
    key = Path(args.sign_key).resolve()
    if not key.is_file():
        raise ClinbundleError(f"--sign-key {key} does not exist (make one: clinbundle keys new)")
    return key


def cmd_keys_new(args: argparse.Namespace) -> int:
    from clinbundle.packaging.signing import new_keypair
    from clinbundle.runtime.signature import key_fingerprint

    private, public = new_keypair(Path(args.out))
    print(f"private key (keep it secret; --sign-key): {private.resolve()}")
    print(
        f"public key ({key_fingerprint(public)}; --key, CLINBUNDLE_TRUSTED_KEY): {public.resolve()}"
    )
    return 0


def cmd_package_bento(args: argparse.Namespace) -> int:
    from clinbundle.packaging.bento import build_bento
    from clinbundle.packaging.onnx_bundle import build_onnx_bundle, parity_reference, verify_bundle

    model, tolerances, sign_key = _resolve(args), _tolerances(args), _sign_key(args)
    reference = None
    if args.bundle:
        bundle = Path(args.bundle)
        verify_bundle(bundle, device="cpu")
    else:
        bundle = _workdir(args) / "bundles" / f"{model.name}-v{model.version}-onnx"
        reference = parity_reference(model, args.validation_volumes)  # once for both checks
        build_onnx_bundle(
            model,
            bundle,
            device="cpu",
            tolerances=tolerances,
            force=True,
            reference=reference,
            sign_key=sign_key,
            runtimes=_runtime_options(args),
        )
    archive, report = build_bento(
        model,
        bundle,
        Path(args.out),
        tolerances=tolerances,
        validation_limit=args.validation_volumes,
        force=args.force,
        reference=reference,
        sign_key=sign_key,
    )
    print(f"parity over HTTP: {report.summary()}")
    print(archive.resolve())
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # any other host name may resolve to a public address
        return False


def check_serve_auth(host: str, token: str | None, insecure_no_auth: bool) -> None:
    """Off loopback, the service answers only with a bearer token, unless the user opts out.

    An open /segment on a network address lets anyone run the model on any data and read its
    provenance; that must be a decision (--insecure-no-auth), warned about at every start.
    """
    if token or _is_loopback(host):
        return
    if insecure_no_auth:
        logging.getLogger("clinbundle.serve").warning(
            "serving on %s with NO authentication (--insecure-no-auth): anyone who can reach "
            "this port can segment data and read /metadata; set CLINBUNDLE_API_TOKEN instead",
            host,
        )
        return
    raise ClinbundleError(
        f"refusing to serve on {host}, which is not a loopback address, without "
        "authentication: set CLINBUNDLE_API_TOKEN (clients then send 'Authorization: Bearer "
        "<token>'), or pass --insecure-no-auth if something in front of it authenticates"
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from clinbundle.packaging.bento import ensure_imported, serve_command

    check_serve_auth(args.host, os.environ.get("CLINBUNDLE_API_TOKEN"), args.insecure_no_auth)
    tag = ensure_imported(Path(args.bento))
    cmd = serve_command(tag, args.host, args.port)
    print(
        f"serving {tag} on http://{args.host}:{args.port} (BentoML store: "
        f"{os.environ.get('BENTOML_HOME')})",
        flush=True,
    )
    os.execv(cmd[0], cmd)
    return 0  # not reached


def cmd_package_map(args: argparse.Namespace) -> int:
    from clinbundle.packaging.map_bundle import build_map

    out, report = build_map(
        _resolve(args),
        Path(args.out),
        device=args.device,
        tolerances=_tolerances(args),
        validation_limit=args.validation_volumes,
        force=args.force,
        sign_key=_sign_key(args),
        runtimes=_runtime_options(args),
        onnx_bundle=Path(args.onnx_bundle) if args.onnx_bundle else None,
    )
    print(f"parity: {report.summary()}")
    print(out.resolve())
    return 0


def cmd_package_monai_bundle(args: argparse.Namespace) -> int:
    from clinbundle.packaging.monai_bundle import build_monai_bundle

    if args.sign_key:
        raise ClinbundleError("--sign-key is not supported for a MONAI bundle (no manifest)")
    out, report = build_monai_bundle(
        _resolve(args),
        Path(args.out),
        device=args.device,
        tolerances=_tolerances(args),
        validation_limit=args.validation_volumes,
        force=args.force,
    )
    print(f"parity: {report.summary()}")
    print(out.resolve())
    return 0


def cmd_run_map(args: argparse.Namespace) -> int:
    from clinbundle.packaging.map_bundle import run_map

    proc = run_map(Path(args.map), Path(args.input), Path(args.output), offline=args.offline)
    print(proc.stdout, end="")
    print(proc.stderr, end="", file=sys.stderr)
    return proc.returncode


def cmd_verify(args: argparse.Namespace) -> int:
    from clinbundle.packaging.onnx_bundle import verify_bundle
    from clinbundle.runtime.signature import check_signature

    key = Path(args.key) if args.key else None
    report = verify_bundle(Path(args.bundle), device=args.device, key=key)
    print(f"{args.bundle}: all files match manifest.json; sample parity {report.summary()}")
    print(f"{args.bundle}: signature {check_signature(Path(args.bundle), key)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from clinbundle.apps.demo import run_demo

    bundle, samples = (Path(p) if p else None for p in (args.bundle, args.samples))
    run_demo(
        _workdir(args),
        args.model,
        bundle,
        args.endpoint,
        args.name,
        args.device,
        args.port,
        samples,
        token=args.token,
        queue=Path(args.queue) if args.queue else None,
    )
    return 0


def _check_predict_args(args: argparse.Namespace) -> None:
    """Combinations argparse cannot express; each one a clear error before any work."""
    if args.flag_worst is not None and args.flag_worst < 0:
        raise ClinbundleError(f"--flag-worst must be >= 0, got {args.flag_worst}")
    if args.dicomweb_token and not args.dicomweb:
        raise ClinbundleError("--dicomweb-token is for a PACS: give --dicomweb URL with it")
    if args.study and not args.dicomweb:
        raise ClinbundleError("--study selects studies of a PACS: give --dicomweb URL with it")
    if args.address and args.engine != "ray":
        raise ClinbundleError("--address is the Ray cluster: give it with --engine ray")
    if args.input:
        src, out = Path(args.input).resolve(), Path(args.output).resolve()
        if out == src or src in out.parents:
            raise ClinbundleError(
                f"--output {args.output} is inside --input {args.input}: a re-run would take "
                "the outputs for new cases; write them elsewhere"
            )


def cmd_predict(args: argparse.Namespace) -> int:
    """Batch inference over a folder (or a PACS): exit 0 when the job ran, even with failed
    cases (the table lists them); 2 when it cannot start."""
    from clinbundle.cohort.batch import predict
    from clinbundle.cohort.model import ModelSpec
    from clinbundle.tracking import configure_tracking

    wd = _workdir(args)
    _check_predict_args(args)
    bundle = Path(args.bundle) if args.bundle else None
    spec = ModelSpec(args.model, bundle, args.device, wd, args.threads, args.runtime)
    configure_tracking(wd)
    if args.dicomweb:
        try:
            from clinbundle.cohort.dicomweb import predict_dicomweb
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("clinbundle.cohort"):
                raise ClinbundleError("DICOMweb input is not installed") from None
            raise
        _rows, summary = predict_dicomweb(args, spec)
    else:
        from clinbundle.cohort.cases import discover
        from clinbundle.cohort.model import model_modality

        cases = discover(Path(args.input), model_modality(spec))
        out, flag = Path(args.output), args.flag_worst or 0
        _rows, summary = predict(
            cases, spec, out, args.engine, args.address, flag, retry_failed=args.retry_failed
        )
    print(summary.line())
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from clinbundle.training.config import config_to_yaml, load_config

    print(config_to_yaml(load_config(Path(args.config) if args.config else None, args.set)), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clinbundle", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=version_text())
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--workdir", default=".", help="where data, MLflow store and runs go")

    def overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", help="YAML file merged over the defaults")
        sp.add_argument(
            "--set", action="append", metavar="KEY=VALUE", help="override, e.g. train.epochs=5"
        )

    data = sub.add_parser("data", help="data sets").add_subparsers(dest="data_cmd", required=True)
    s = data.add_parser("synth", help="write the synthetic 3D vessel data set (MSD layout)")
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=16, help="training volumes")
    s.add_argument("--n-test", type=int, default=4, help="held-out volumes with labels")
    s.add_argument("--shape", type=int, nargs=3, default=[64, 64, 64], metavar=("D", "H", "W"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument(
        "--mixed-geometry",
        action="store_true",
        help="store cases at mixed spacings (0.8x0.8x1.5 mm, ...) and orientations (RAS, LPS)",
    )
    s.set_defaults(func=cmd_synth)
    ac = data.add_parser(
        "add-corrections",
        help="corrected labels of flagged cases into an MSD folder (the next training uses them)",
        description="Each LABELS/<case_id>.nii.gz of a case the table flagged is validated like "
        "training data and added, with its image from the table's input, to DATA's imagesTr/, "
        "labelsTr/ and dataset.json; any bad or unflagged label refuses the whole call (exit 2).",
    )
    ac.add_argument("--table", required=True, help="predictions.parquet (or .csv) of a predict run")
    ac.add_argument("--labels", required=True, help="folder of corrected <case_id>.nii.gz labels")
    ac.add_argument("--data", required=True, help="MSD folder (dataset.json) to add them to")
    ac.set_defaults(func=cmd_add_corrections)

    t = sub.add_parser(
        "train",
        help="train on an MSD-style folder, log and register in MLflow",
        description="Train one model, or a grid: --folds all and/or --set KEY=a,b cross every "
        "value under one parent MLflow run (a child run per trial). Example: clinbundle train "
        "--data data/vessels --folds all --set loss.name=dice_ce,cbdice_cldice",
    )
    t.add_argument("--data", help="MSD-style folder (or set data.root)")
    t.add_argument(
        "--folds",
        metavar="all|0,1,..",
        help="train these folds of data.folds (a grid: one parent run, a child run per fold)",
    )
    t.add_argument(
        "--resume",
        metavar="RUN_ID",
        help="continue an interrupted run (or `latest`: the newest interrupted one) from its "
        "`last` checkpoint on the tracking server, with the run's own config",
    )
    t.add_argument(
        "--nproc",
        type=int,
        help="train with N processes (DDP) on this machine: re-runs itself under torchrun",
    )
    t.add_argument(
        "--production",
        action="store_true",
        help="train on all labelled pairs, no validation split (= --set train.production=true); "
        "the model is `last` and `promote` refuses its version. Example: clinbundle train "
        "--data data/vessels --production --set train.checkpoint_every_epochs=5",
    )
    t.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where a grid's trials run: one after the other here (local), or each a Ray task "
        "(ray; needs an http(s) tracking server). Example: clinbundle train --data data/vessels "
        "--folds all --engine ray --address 10.0.0.5:6379 --tracking-uri http://10.0.0.5:5000",
    )
    t.add_argument("--address", help="Ray cluster (HOST:PORT) for --engine ray; none: local Ray")
    t.add_argument(
        "--tracking-uri", help="MLflow tracking server (= --set tracking.tracking_uri=URI)"
    )
    t.add_argument(
        "--trial-cpus", type=float, default=1.0, help="CPUs per trial on Ray (default 1)"
    )
    t.add_argument(
        "--trial-gpus",
        type=float,
        help="GPUs per trial on Ray (default: 1 if the cluster has GPUs and the device allows)",
    )
    common(t)
    overrides(t)
    t.set_defaults(func=cmd_train)

    pr = sub.add_parser(
        "promote",
        help="move @champion to @challenger on evidence (paired bootstrap CI)",
        description="Score @challenger and @champion on the same held-out volumes; move "
        "@champion only if the lower bound of the paired difference's BCa 95%% CI is above "
        "--min-improvement. Example: clinbundle promote --model vessel-seg --data data/vessels "
        "--metric dice --min-improvement 0.01",
    )
    pr.add_argument("--model", required=True, help="registered model name")
    pr.add_argument("--data", required=True, help="MSD folder whose 'test' pairs are held out")
    pr.add_argument("--metric", default="dice", help="a case metric of the registry (dice)")
    pr.add_argument(
        "--minimum", type=float, default=0.5, help="first champion needs this (default 0.5)"
    )
    pr.add_argument(
        "--min-improvement",
        type=float,
        default=0.0,
        help="the paired CI's lower bound must exceed this, in the metric's direction (default 0)",
    )
    pr.add_argument(
        "--min-volumes",
        type=int,
        help="refuse to decide (exit 2) on fewer held-out volumes (default: 3)",
    )
    common(pr)
    pr.set_defaults(func=cmd_promote)

    en = sub.add_parser(
        "ensemble",
        help="register several trained models (e.g. a grid's folds) as one averaging model",
        description="Average the members' softmax in one model (one pyfunc, one ONNX graph)\n"
        "and register it as @challenger. Examples:\n"
        "  clinbundle ensemble --from GRID_RUN_ID --workdir work\n"
        "  clinbundle ensemble --from models:/vessel-seg/3,models:/vessel-seg/4 "
        "--mirror-axes 0 1 2 --workdir work",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    en.add_argument(
        "--from",
        dest="sources",
        required=True,
        metavar="GRID_OR_RUNS",
        help="comma list of run ids, models:/ or runs:/ URIs; or a grid's parent run id "
        "(its finished child runs)",
    )
    en.add_argument("--name", help="registered model name (default: the members' name)")
    en.add_argument(
        "--mirror-axes",
        type=int,
        nargs="+",
        choices=[0, 1, 2],
        metavar="AXIS",
        help="test-time mirroring along these spatial axes (0 1 2 = D H W); every flip "
        "combination is averaged: 2**len(axes) forward passes per member",
    )
    common(en)
    en.set_defaults(func=cmd_ensemble)

    ev = sub.add_parser(
        "evaluate",
        help="every best_* checkpoint and last of a run or grid, on the held-out set, with CIs",
        description="Evaluate the checkpoints of a training run (or of every run of a grid) on "
        "the held-out set through the one inference path; one MLflow evaluation run per "
        "checkpoint (mlflow.models.evaluate, BCa 95%% CIs). Example: clinbundle evaluate "
        "RUN_ID --data data/vessels; clinbundle evaluate RUN_ID --from-predictions "
        "--metrics-module mymetrics",
    )
    ev.add_argument("run", help="training run id, or a grid's parent run id")
    ev.add_argument("--data", help="MSD folder with the held-out 'test' pairs (default: the run's)")
    ev.add_argument("--checkpoints", help="only these, e.g. best_dice,last (default: all)")
    ev.add_argument(
        "--from-predictions",
        action="store_true",
        help="recompute every registered metric from the saved predictions (no network)",
    )
    ev.add_argument("--metrics-module", help="Python module that registers custom metrics")
    ev.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    common(ev)
    ev.set_defaults(func=cmd_evaluate)

    cp = sub.add_parser(
        "compare",
        help="losses x folds x checkpoints of a grid: paired tests, tags, aliases, report",
        description="Compare a grid's evaluated runs: table, paired bootstrap tests between "
        "losses, model version tags (is_best_for_loss, ...), per-loss aliases and a Markdown "
        "report with plots on the grid run. Example: clinbundle compare GRID_RUN_ID --metric dice",
    )
    cp.add_argument("grid", help="the grid's parent run id (clinbundle train --folds ...)")
    cp.add_argument("--metric", default="dice", help="the metric that ranks versions (dice)")
    cp.add_argument("--metrics-module", help="Python module that registers custom metrics")
    common(cp)
    cp.set_defaults(func=cmd_compare)

    q = sub.add_parser("quickstart", help="synthetic data -> train -> register -> champion")
    q.add_argument("--min-dice", type=float, default=0.7, help="held-out Dice to become champion")
    q.add_argument(
        "--package",
        action="store_true",
        help="then package the champion as every format (ONNX bundle, bento, MAP build "
        "context, MONAI bundle), each parity-checked, and print the command that runs each",
    )
    common(q)
    q.add_argument("--set", action="append", metavar="KEY=VALUE", help="training override")
    q.set_defaults(func=cmd_quickstart)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument(
            "--model",
            help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, a version "
            "number or a name (default: models:/NAME@champion)",
        )
        sp.add_argument(
            "--name", default="vessel-seg", help="registered model name for short forms"
        )
        sp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sp.add_argument("--max-abs", type=float, help="parity: max abs probability difference")
        sp.add_argument("--max-flips", type=float, help="parity: max fraction of flipped labels")
        sp.add_argument("--min-dice", type=float, help="parity: min Dice per label between masks")
        sp.add_argument(
            "--validation-volumes", type=int, default=2, help="run's val volumes in the suite"
        )
        sp.add_argument("--force", action="store_true", help="replace an existing output folder")
        sp.add_argument(
            "--sign-key",
            metavar="PEM",
            help="EC private key (clinbundle keys new): sign the bundle (model.sig) before it "
            "is moved into place",
        )
        rt = sp.add_argument_group(
            "runtimes",
            "every available runtime (ONNX Runtime, OpenVINO, compiled PyTorch) is parity-"
            "checked and timed; the fastest passer becomes the bundle's default, e.g. "
            "--threads 2 --bench-shape 128 128 128",
        )
        rt.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
        rt.add_argument(
            "--bench-shape",
            type=int,
            nargs=3,
            metavar=("D", "H", "W"),
            help="volume the candidates are timed on (default: twice the roi)",
        )
        rt.add_argument(
            "--runtimes",
            choices=["all", "onnxruntime"],
            help="all: measure every candidate (default; CLINBUNDLE_PACKAGE_RUNTIMES); "
            "onnxruntime: ship ONNX Runtime only, untimed",
        )
        rt.add_argument(
            "--bf16-max-abs",
            type=float,
            help="also hold the bf16 candidate to this max abs difference (default: Dice rule)",
        )
        common(sp)

    pkg = sub.add_parser("package", help="champion -> parity-checked deployment bundle")
    formats = pkg.add_subparsers(dest="format", required=True)
    po = formats.add_parser("onnx", help="ONNX bundle: model.onnx, manifest, model card, parity")
    po.add_argument("--out", required=True, help="bundle folder to create")
    reduced = po.add_mutually_exclusive_group()
    reduced.add_argument(
        "--fp16", action="store_true", help="fp16 weights (gated on Dice >= 0.995)"
    )
    reduced.add_argument(
        "--bf16",
        action="store_true",
        help="let OpenVINO bf16 (Dice >= 0.995; CPUs with bf16 units) be the default runtime "
        "where it is the fastest",
    )
    po.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    model_args(po)
    po.set_defaults(func=cmd_package_onnx)

    pb = formats.add_parser("bento", help="BentoML bento, parity-checked over real HTTP")
    pb.add_argument("--out", required=True, help="folder for the .bento archive and report")
    pb.add_argument("--bundle", help="an existing ONNX bundle to serve (default: make one)")
    model_args(pb)
    pb.set_defaults(func=cmd_package_bento)

    sv = sub.add_parser("serve", help="serve a .bento archive (or its folder) with BentoML")
    sv.add_argument("bento", help="the .bento archive, or the folder `package bento` wrote")
    sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 inside a container")
    sv.add_argument("--port", type=int, default=3000)
    sv.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="serve off loopback without CLINBUNDLE_API_TOKEN (a warning at every start)",
    )
    common(sv)
    sv.set_defaults(func=cmd_serve)

    pm = formats.add_parser("map", help="MONAI Deploy MAP build context (DICOM/NIfTI app), parity")
    pm.add_argument("--out", required=True, help="build context folder to create")
    pm.add_argument(
        "--onnx-bundle",
        help="nest this ONNX bundle of the same model version (made with the same tolerances, "
        "parity passed; checked, exit 2 otherwise) instead of making a new one",
    )
    model_args(pm)
    pm.set_defaults(func=cmd_package_map)

    mb = formats.add_parser(
        "monai-bundle",
        help="MONAI bundle (Model Zoo layout) for monai.bundle run, MONAI Label, 3D Slicer",
        description="Write the champion as a MONAI bundle: configs/ (metadata, inference), "
        "models/model.pt, docs/README.md, LICENSE. Verified with MONAI's verify_metadata and "
        "verify_net_in_out, then run with `python -m monai.bundle run` on the parity suite; "
        "nothing is written if its answers differ from PyTorch's.",
        epilog="example: clinbundle package monai-bundle --workdir work "
        "--model models:/vessel-seg@champion --out bundles/vessel-seg-monai",
    )
    mb.add_argument("--out", required=True, help="bundle folder to create")
    model_args(mb)
    mb.set_defaults(func=cmd_package_monai_bundle)

    rm = sub.add_parser("run-map", help="run a MAP build context's app: python app -i -o -m")
    rm.add_argument("map", help="folder made by `clinbundle package map`")
    rm.add_argument("-i", "--input", required=True, help="DICOM series or NIfTI files")
    rm.add_argument("-o", "--output", required=True, help="output folder (DICOM SEG / NIfTI)")
    rm.add_argument("--offline", action="store_true", help="no network: unshare --net (root)")
    rm.set_defaults(func=cmd_run_map)

    v = sub.add_parser("verify", help="check a bundle's hashes and re-run its sample parity")
    v.add_argument("bundle")
    v.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    v.add_argument(
        "--key",
        metavar="PUB.pem",
        help="public key the bundle must be signed with (default: CLINBUNDLE_TRUSTED_KEY)",
    )
    common(v)
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser(
        "demo",
        help="Gradio reviewer demo on 127.0.0.1 (model, bundle or bento)",
        description="The reviewer page. With --queue it opens the flagged cases of a predict "
        "table one after another, e.g. clinbundle demo --queue out/predictions.parquet "
        "--workdir work",
    )
    d.add_argument("--model", help="registered model for the PyTorch runtime (as for package)")
    d.add_argument("--bundle", help="ONNX bundle folder for the ONNX runtime")
    d.add_argument("--endpoint", help="URL of a running bento service (POST /segment)")
    d.add_argument("--name", default="vessel-seg", help="registered model name for short forms")
    d.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    d.add_argument("--port", type=int, default=7860)
    d.add_argument(
        "--token",
        help="bearer token for --endpoint (default: CLINBUNDLE_API_TOKEN; the variable keeps "
        "it out of the process list)",
    )
    d.add_argument("--samples", help="MSD folder whose held-out pairs are the samples")
    d.add_argument(
        "--queue",
        metavar="TABLE",
        help="review the flagged cases of a `predict` table (predictions.parquet), most "
        "uncertain first, with the labels predict stored; reviews go to the table's model "
        "version (needs the --workdir or MLFLOW_TRACKING_URI that predict used)",
    )
    common(d)
    d.set_defaults(func=cmd_demo)

    pd = sub.add_parser(
        "predict",
        help="batch inference over a folder of NIfTI files / DICOM studies (or a PACS)",
        description="Runs every case through the model (resumable: a re-run skips done cases, "
        "redoes runtime failures, keeps input failures); writes <case>_seg.nii.gz, predictions.*, "
        "manifest.jsonl into --output, and logs an MLflow run in experiment batch-inference. "
        "A DICOM study also gets <study>_seg.dcm (DICOM SEG); with --dicomweb the studies come "
        "from a PACS (QIDO-RS, WADO-RS) and each SEG is stored back into its study (STOW-RS).",
    )
    src = pd.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registered model (as for package), run in PyTorch")
    src.add_argument("--bundle", help="ONNX bundle folder, run on its chosen runtime")
    inp = pd.add_mutually_exclusive_group(required=True)
    inp.add_argument("--input", help="folder of NIfTI files or DICOM studies (any layout)")
    inp.add_argument(
        "--dicomweb",
        metavar="URL",
        help="DICOMweb root of a PACS, e.g. http://pacs:8042/dicom-web (needs the pacs extra)",
    )
    pd.add_argument("--study", action="append", metavar="UID", help="with --dicomweb: a study")
    pd.add_argument(
        "--dicomweb-token",
        help="bearer token for --dicomweb (default: CLINBUNDLE_DICOMWEB_TOKEN; the variable keeps "
        "it out of the process list)",
    )
    pd.add_argument("--output", required=True, help="folder for outputs, table and manifest")
    pd.add_argument("--engine", default="local", choices=["local", "ray"])
    pd.add_argument("--address", help="with --engine ray: the cluster (default: a local Ray)")
    pd.add_argument(
        "--flag-worst", type=int, metavar="N", help="flag the N most uncertain cases for review"
    )
    pd.add_argument(
        "--retry-failed",
        action="store_true",
        help="run again the cases that failed on their own input (they are kept otherwise)",
    )
    pd.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    pd.add_argument("--threads", type=int, help="inference threads (default: physical cores)")
    pd.add_argument(
        "--runtime",
        help="with --bundle: one of its shipped runtimes, e.g. onnxruntime (default: "
        "CLINBUNDLE_RUNTIME, else the one measured fastest at packaging)",
    )
    common(pd)
    pd.set_defaults(func=cmd_predict)

    k = sub.add_parser("keys", help="signing keys").add_subparsers(dest="keys_cmd", required=True)
    kn = k.add_parser("new", help="a new EC P-256 key pair (private key mode 0600) for --sign-key")
    kn.add_argument("--out", required=True, help="folder for signing-key.pem and .pub.pem")
    kn.set_defaults(func=cmd_keys_new)

    c = sub.add_parser("config", help="print the resolved training config")
    overrides(c)
    c.set_defaults(func=cmd_config)
    add_examples(p)
    return p


def _command_path(args: argparse.Namespace) -> tuple[str, ...]:
    """The sub-command names given, e.g. ("package", "bento"); ("quickstart", "--package")."""
    names = (args.command, *(getattr(args, k, None) for k in ("data_cmd", "format", "keys_cmd")))
    flags = ("--package",) if args.command == "quickstart" and getattr(args, "package", 0) else ()
    return (*(n for n in names if n), *flags)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        if "WORLD_SIZE" not in os.environ
        else f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow.store", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if hasattr(args, "workdir"):
        _keep_inside(_workdir(args))
    try:
        require_extras(_command_path(args))
        return args.func(args)
    except ModuleNotFoundError as e:  # an optional extra's module, imported deeper down
        if extra_of(e.name) is None:
            raise
        print(f"error: {missing_extra(extra_of(e.name), e.name)}", file=sys.stderr)
        return 2
    except Preempted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except ClinbundleError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
