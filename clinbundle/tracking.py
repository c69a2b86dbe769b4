"""Where MLflow lives: sqlite in the work dir by default, `MLFLOW_TRACKING_URI` when set.

Shared by training, promotion and packaging so that every command of one work dir finds the same
registry. The registry URI always follows the tracking URI.
"""

from __future__ import annotations

import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from clinbundle.runtime.errors import TrackingError

log = logging.getLogger("clinbundle.tracking")


def configure_tracking(workdir: Path, uri: str | None = None) -> str:
    """Point MLflow at `uri`, else $MLFLOW_TRACKING_URI, else sqlite:///WORKDIR/mlflow.db.

    Remote servers are probed once (their /health endpoint) so that an unreachable server is one
    clear error before training starts, not minutes of retries after it.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        workdir.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as r:
                r.read()
        except (urllib.error.URLError, OSError) as e:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({e}); start it "
                "(`mlflow server --host 127.0.0.1 --port 5000`) or unset MLFLOW_TRACKING_URI "
                "to use sqlite in the work dir"
            ) from None
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    log.info("MLflow tracking and registry: %s", uri)
    return uri


def experiment_id(name: str, workdir: Path) -> str:
    """Get or create the experiment; local stores keep artifacts inside the work dir."""
    client = MlflowClient()
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    uri = mlflow.get_tracking_uri()
    location = None
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        location = (workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


#: MLflow's own nested-run tag: a grid's trials carry their parent run's id in it.
PARENT_TAG = "mlflow.parentRunId"


def child_runs(client: MlflowClient, parent, finished_only: bool = False) -> list:
    """The child runs of `parent` (an MLflow Run) in its experiment, oldest first."""
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    if finished_only:
        query += " and attributes.status = 'FINISHED'"
    return client.search_runs(
        [parent.info.experiment_id], filter_string=query, order_by=["attributes.start_time ASC"]
    )
