"""`clinbundle quickstart`: synthetic data -> trained DynUNet -> registered -> champion.

Everything lands in the work dir (data, MLflow store, run files), so a second command run in the
same folder (or with the same MLFLOW_TRACKING_URI) finds the same registry.
"""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path

from clinbundle.registry import promote
from clinbundle.runtime.errors import ClinbundleError
from clinbundle.tracking import configure_tracking

log = logging.getLogger("clinbundle.quickstart")

#: Synthetic data of the quickstart: 16 training and 4 held-out volumes of 64^3.
SYNTH = {"n": 16, "shape": (64, 64, 64), "seed": 0, "n_test": 4}


def _synth_matches(meta: Path, synth: dict) -> bool:
    """Reuse data from an earlier quickstart only if it was made with the same settings."""
    if not meta.exists():
        return False
    d = json.loads(meta.read_text())
    made = d.get("synth") or {}
    return (made.get("seed"), made.get("shape"), d.get("numTraining"), d.get("numTest")) == (
        synth["seed"],
        list(synth["shape"]),
        synth["n"],
        synth["n_test"],
    )


def quickstart_config_path() -> Path:
    return Path(str(resources.files("clinbundle").joinpath("configs/quickstart.yaml")))


def run_quickstart(
    workdir: Path,
    overrides: list[str] | None = None,
    min_dice: float = 0.7,
    synth: dict | None = None,
    package: bool = False,
) -> str:
    """Train and promote the quickstart model; with `package`, go on to every format
    (`clinbundle.packaging.every_format`). Returns the champion's URI."""
    from clinbundle.training.run import run_training
    from clinbundle.training.synth import write_dataset

    synth = SYNTH | (synth or {})
    data = workdir / "data" / "synthetic-vessels"
    meta = data / "dataset.json"
    if not _synth_matches(meta, synth):
        log.info("writing synthetic data to %s", data)
        write_dataset(data, **synth)
    configure_tracking(workdir)
    state = run_training(
        workdir,
        config_path=quickstart_config_path(),
        overrides=[f"data.root={data}", *(overrides or [])],
    )
    name = state.config.tracking.model_name
    decision = promote(name, data, metric="dice", minimum=min_dice)
    ch = decision.challenger
    print(
        f"held-out Dice of version {ch.version}: {ch.mean:.3f} "
        f"(95% CI {ch.ci95[0]:.3f}..{ch.ci95[1]:.3f}, {len(ch.per_volume)} volumes)"
    )
    print(decision.reason)
    if not decision.promoted:
        raise ClinbundleError(
            f"the quickstart model did not become champion: {decision.reason}. "
            "Train longer (--set train.epochs=...) and run quickstart again."
        )
    uri = f"models:/{name}@champion"
    if package:
        _package(workdir, uri)
    return uri


def _package(workdir: Path, uri: str) -> None:
    from clinbundle.packaging.every_format import describe, package_every_format, shown
    from clinbundle.packaging.model_source import resolve_model

    model = resolve_model(uri, workdir / "cache" / "models")
    shipped = package_every_format(model, workdir)
    print(describe(shipped))
    onnx = next(s.path for s in shipped if s.format == "ONNX bundle")
    print(
        f"  reviewer demo:\n    $ clinbundle demo --bundle {shown(onnx)} --workdir {shown(workdir)}"
    )
