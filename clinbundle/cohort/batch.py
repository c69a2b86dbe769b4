"""`clinbundle predict` end to end: cases -> rows -> flags -> table -> an MLflow batch run
linked to the model version it ran.

The batch run lives in the experiment `batch-inference`; the model version gets the tag
`last_batch_run` (the run id) so that the registry leads to the newest cohort a version ran on.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from clinbundle.cohort.cases import Case
from clinbundle.cohort.job import engine_runner, run_cohort
from clinbundle.cohort.model import CohortModel, ModelSpec, open_model
from clinbundle.cohort.table import flag_worst, write_table

log = logging.getLogger("clinbundle.cohort")

EXPERIMENT = "batch-inference"
VERSION_TAG = "last_batch_run"


@dataclass
class Summary:
    cases: int
    done: int
    failed: int
    ran: int  # cases run now (the rest came from the manifest)
    seconds: float
    cases_per_min: float
    table: str
    run_id: str | None = None

    def line(self) -> str:
        rate = f"{self.cases_per_min:.1f} cases/min" if self.ran else "nothing new to run"
        tracked = f"; MLflow run {self.run_id}" if self.run_id else ""
        return (
            f"{self.cases} case(s): {self.done} done, {self.failed} failed "
            f"({self.ran} run now, {rate}); table {self.table}{tracked}"
        )


def predict(
    cases: list[Case],
    spec: ModelSpec,
    output_dir: Path,
    engine: str = "local",
    address: str | None = None,
    flag: int = 0,
    track: bool = True,
    retry_failed: bool = False,
) -> tuple[list[dict], Summary]:
    """Run the cohort, flag the `flag` most uncertain cases, write the table, log the run
    (`track=False`: no MLflow run, e.g. for a caller that logs its own)."""
    output_dir = Path(output_dir)
    engine_runner(engine)  # an unknown or missing engine fails before the model is opened
    model = open_model(spec)
    t0 = time.perf_counter()
    before = _manifest_lines(output_dir)
    rows = run_cohort(
        cases, spec, output_dir, engine, address, model=model, retry_failed=retry_failed
    )
    seconds = time.perf_counter() - t0
    ran = _manifest_lines(output_dir) - before
    flag_worst(rows, flag)
    parquet, _csv = write_table(rows, output_dir)
    done = sum(r["status"] == "done" for r in rows)
    summary = Summary(
        cases=len(rows),
        done=done,
        failed=len(rows) - done,
        ran=ran,
        seconds=round(seconds, 3),
        cases_per_min=round(60 * ran / seconds, 2) if ran and seconds > 0 else 0.0,
        table=str(parquet),
    )
    if track:
        summary.run_id = log_batch_run(model, engine, output_dir, summary, Path(spec.workdir))
    return rows, summary


def _manifest_lines(output_dir: Path) -> int:
    from clinbundle.cohort.manifest import MANIFEST

    path = output_dir / MANIFEST
    return sum(1 for line in path.open() if line.strip()) if path.is_file() else 0


def log_batch_run(
    model: CohortModel, engine: str, output_dir: Path, summary: Summary, workdir: Path
) -> str:
    """One MLflow run for the job: tags, metrics, the table and summary; tag the version."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from clinbundle.cohort.table import TABLE_CSV, TABLE_PARQUET
    from clinbundle.tracking import experiment_id

    exp = experiment_id(EXPERIMENT, workdir)
    tags = {
        "model_name": model.name,
        "model_version": model.version,
        "runtime": model.runtime,
        "engine": engine,
    }
    name = f"predict {model.name} v{model.version}"
    with mlflow.start_run(experiment_id=exp, run_name=name, tags=tags) as run:
        mlflow.log_metrics(
            {
                "cases_done": summary.done,
                "cases_failed": summary.failed,
                "cases_run": summary.ran,
                "cases_per_min": summary.cases_per_min,
            }
        )
        mlflow.log_artifact(str(output_dir / TABLE_PARQUET))
        mlflow.log_artifact(str(output_dir / TABLE_CSV))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "summary.json"
            path.write_text(json.dumps(asdict(summary) | tags, indent=2))
            mlflow.log_artifact(str(path))
    try:
        MlflowClient().set_model_version_tag(
            model.name, model.version, VERSION_TAG, run.info.run_id
        )
    except MlflowException as e:
        log.warning(
            "model %s v%s is not in this registry (%s): the batch run is not linked to it",
            model.name,
            model.version,
            e.message.splitlines()[0],
        )
    log.info("MLflow batch run %s (%s)", run.info.run_id, name)
    return run.info.run_id
