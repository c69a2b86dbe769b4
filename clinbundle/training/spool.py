"""Delivery of one run's metrics, tags and artifacts to a tracking server that may blip.

On a throw-away GPU instance the tracking server is the only thing that survives, and it may be
unreachable for a while (restart, network blip). Training must not stop for that, and nothing
logged may be lost or logged twice. So:

- MLflow's own HTTP retries are turned down (`configure_http`): it would otherwise block a
  training step for minutes. Outages are handled here instead.
- Each entry is sent at once while the server answers. When a send fails and the server's
  `/health` does not answer either, an outage starts: this entry and every later one go, in
  order, into a spool in the run folder (`queue.jsonl`, plus a copy of each artifact file as it
  was when it was logged, since the loop overwrites `last.pt` and predictions).
- While the outage lasts, the server is probed with growing back-off (at most every 30 s); once
  it answers, the spool is flushed in order, then new entries go straight through again.
- A send that failed may still have landed (a timed-out request). Metrics are logged with an
  explicit step and a fixed timestamp; before a metric entry is sent again, the steps the server
  already holds for its keys are fetched and dropped from it. Tags and artifacts are idempotent
  (same key, same path: overwritten).
- An outage longer than `outage_limit_s` raises `TrackingError`, naming the spool.

With a local store (sqlite, file) there is no server to lose: errors propagate as before.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from mlflow.entities import Metric, RunTag
from mlflow.exceptions import RestException
from mlflow.tracking import MlflowClient

from clinbundle.runtime.errors import TrackingError

log = logging.getLogger("clinbundle.tracking")

T = TypeVar("T")

#: Back-off between probes of an unreachable server: doubles from 1 s up to this.
MAX_PROBE_INTERVAL_S = 30.0


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def server_answers(uri: str, timeout: float = 3.0) -> bool:
    """True if the tracking server's /health endpoint answers."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as r:
            r.read()
        return True
    except (urllib.error.URLError, OSError):
        return False


def configure_http(timeout_s: int) -> dict[str, str | None]:
    """Turn MLflow's HTTP retries down so the spool, not MLflow, rides out outages.

    Variables the user has set are kept (and said so); returns the previous values for
    `restore_http`.
    """
    wanted = {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s),
    }
    previous: dict[str, str | None] = {}
    for var, value in wanted.items():
        previous[var] = os.environ.get(var)
        if previous[var] is not None:
            log.info("%s=%s kept from the environment", var, previous[var])
            continue
        os.environ[var] = value
        log.info("%s=%s (outages are spooled locally instead of retried by MLflow)", var, value)
    return previous


def restore_http(previous: dict[str, str | None]) -> None:
    for var, value in previous.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


class RunSpool:
    """Ordered, outage-tolerant logging of metrics, tags and artifacts for one MLflow run."""

    def __init__(
        self,
        run_id: str,
        tracking_uri: str,
        spool_dir: Path,
        outage_limit_s: float,
        confirmed: set[tuple[str, int]] | None = None,
    ) -> None:
        self.run_id = run_id
        self.uri = tracking_uri
        self.remote = is_remote(tracking_uri)
        self.dir = spool_dir
        self.limit = outage_limit_s
        self.client = MlflowClient(tracking_uri)
        #: (metric key, step) pairs the server is known to hold: never sent again
        self.confirmed: set[tuple[str, int]] = set(confirmed or ())
        self.queue: list[dict[str, Any]] = []
        self.outage_since: float | None = None
        self.outages = 0
        self._seq = 0
        self._probe_at = 0.0
        self._interval = 1.0

    # --- what the callback calls ---------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        ts = int(time.time() * 1000)
        rows = [
            [k, float(v), step, ts] for k, v in metrics.items() if (k, step) not in self.confirmed
        ]
        if rows:
            self._submit({"kind": "metrics", "rows": rows})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._submit({"kind": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: Path, artifact_dir: str) -> None:
        self._submit({"kind": "artifact", "path": str(path), "dir": artifact_dir})

    @property
    def pending(self) -> int:
        return len(self.queue)

    def flush(self, limit_s: float | None = None) -> None:
        """Block until the spool is empty; give up (TrackingError) when the outage is too long."""
        limit = self.limit if limit_s is None else limit_s
        while self.queue:
            self._probe_at = 0.0
            if self._try_flush():
                return
            self._check_limit(limit)
            time.sleep(min(self._interval, 2.0))

    def call(self, fn: Callable[[], T], what: str) -> T:
        """Run one request that must succeed (start, model logging, registration), riding out an
        outage up to the limit. Only for requests that are safe to repeat."""
        while True:
            try:
                result = fn()
            except Exception as e:
                if not self._is_outage(e):
                    raise
                self._begin_outage(what, e)
                self._check_limit(self.limit)
                time.sleep(min(self._interval, 5.0))
                self._interval = min(self._interval * 2, MAX_PROBE_INTERVAL_S)
                continue
            if self.outage_since is not None and not self.queue:
                self._end_outage()
            return result

    # --- internals -----------------------------------------------------------------------------
    def _submit(self, op: dict[str, Any]) -> None:
        if self.outage_since is None and not self.queue:
            try:
                self._send(op)
                return
            except Exception as e:
                if not self._is_outage(e):
                    raise
                self._begin_outage(op["kind"], e)
        self._enqueue(op)
        self._try_flush()
        self._check_limit(self.limit)

    def _send(self, op: dict[str, Any]) -> None:
        kind = op["kind"]
        if kind == "metrics":
            rows = op["rows"]
            if op.get("uncertain"):  # an earlier attempt may have landed: drop what did
                rows = [r for r in rows if (r[0], r[2]) not in self._server_steps(rows)]
            if rows:
                self.client.log_batch(
                    self.run_id, metrics=[Metric(k, v, ts, s) for k, v, s, ts in rows]
                )
            self.confirmed |= {(r[0], r[2]) for r in op["rows"]}
        elif kind == "tags":
            self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifact":
            path = op.get("copy") or op["path"]  # the spooled copy keeps the file's name
            self.client.log_artifact(self.run_id, path, op["dir"] or None)
        else:
            raise ValueError(f"unknown spool entry {kind}")

    def _server_steps(self, rows: list[list[Any]]) -> set[tuple[str, int]]:
        have: set[tuple[str, int]] = set()
        for key in {r[0] for r in rows}:
            have |= {(key, m.step) for m in self.client.get_metric_history(self.run_id, key)}
        return have

    def _is_outage(self, error: Exception) -> bool:
        """A failed request is an outage if the server does not answer /health right after."""
        if not self.remote:
            return False
        if isinstance(error, RestException) and error.get_http_status_code() < 500:
            return False  # the server answered: a real error, not an outage
        return not server_answers(self.uri)

    def _begin_outage(self, what: str, error: Exception) -> None:
        if self.outage_since is None:
            self.outage_since = time.monotonic()
            self.outages += 1
            self._probe_at = self.outage_since + 1.0
            self._interval = 1.0
            log.warning(
                "tracking server %s unreachable (%s while logging %s); training goes on, "
                "logging is spooled in %s and flushed when it returns (gives up after "
                "tracking.outage_limit_s=%.0f s)",
                self.uri,
                type(error).__name__,
                what,
                self.dir,
                self.limit,
            )

    def _end_outage(self) -> None:
        assert self.outage_since is not None
        log.warning(
            "tracking server %s is back after %.1f s; spool flushed",
            self.uri,
            time.monotonic() - self.outage_since,
        )
        self.outage_since = None
        self._interval = 1.0

    def _enqueue(self, op: dict[str, Any]) -> None:
        self._seq += 1
        op = dict(op, seq=self._seq, uncertain=True)
        if op["kind"] == "artifact":
            # a newer version of the same artifact replaces the queued one (latest wins anyway)
            dest = (op["dir"], Path(op["path"]).name)
            for old in [q for q in self.queue if q["kind"] == "artifact"]:
                if (old["dir"], Path(old["path"]).name) == dest:
                    self.queue.remove(old)
                    shutil.rmtree(Path(old["copy"]).parent, ignore_errors=True)
            copy = self.dir / "files" / f"{self._seq:06d}" / Path(op["path"]).name
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op["path"], copy)
            op["copy"] = str(copy)
        self.queue.append(op)
        self._persist()

    def _persist(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "queue.jsonl.tmp"
        tmp.write_text("".join(json.dumps(q) + "\n" for q in self.queue))
        os.replace(tmp, self.dir / "queue.jsonl")

    def _try_flush(self) -> bool:
        """Probe (if due) and send the spool in order; True when it is empty."""
        if not self.queue:
            return True
        now = time.monotonic()
        if now < self._probe_at:
            return False
        if not server_answers(self.uri):
            self._interval = min(self._interval * 2, MAX_PROBE_INTERVAL_S)
            self._probe_at = now + self._interval
            return False
        while self.queue:
            op = self.queue[0]
            try:
                self._send(op)
            except Exception as e:
                if not self._is_outage(e):
                    raise
                self._probe_at = time.monotonic() + self._interval
                return False
            self.queue.pop(0)
            if op.get("copy"):
                shutil.rmtree(Path(op["copy"]).parent, ignore_errors=True)
            self._persist()
        if self.outage_since is not None:
            self._end_outage()
        return True

    def _check_limit(self, limit: float) -> None:
        if self.outage_since is None:
            return
        down = time.monotonic() - self.outage_since
        if down > limit:
            raise TrackingError(
                f"the tracking server {self.uri} has been unreachable for {down:.0f} s "
                f"(limit {limit:.0f} s, tracking.outage_limit_s); giving up. "
                f"{len(self.queue)} unsent entries are spooled in {self.dir}"
            )
