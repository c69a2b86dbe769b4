"""`clinbundle predict --engine ray [--address ADDR]`: the cohort as a Ray Data pipeline.

One row per case -> `map_batches` on a fixed pool of actors, each of which opens the model once
from the picklable `ModelSpec` and runs `job.predict_case` (the local engine's very function)
-> the rows stream back to the driver, which appends each to the manifest as it lands.

Fault tolerance is Ray's: a dead actor is restarted (`max_restarts`) and its case retried
(`max_task_retries`), on another node if its node is gone. A retried case writes the same
output name atomically, so it overwrites its own output; rows are deduplicated by case before
they are handed on, so every case is in the table and on disk exactly once.

Pool size, CPUs and GPUs per actor are decided here, logged, and overridable with the
environment variables CLINBUNDLE_RAY_ACTORS and CLINBUNDLE_RAY_ACTOR_CPUS (GPUs follow
--device: cuda -> 1 per actor, auto -> 1 when the cluster has GPUs, cpu -> 0).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from clinbundle.cohort.atomic import remove_stale_temps
from clinbundle.cohort.cases import Case
from clinbundle.cohort.model import ModelSpec, open_model
from clinbundle.ray_cluster import import_ray, ray_session
from clinbundle.runtime.errors import ClinbundleError, DeviceError

log = logging.getLogger("clinbundle.cohort")

ACTORS_ENV = "CLINBUNDLE_RAY_ACTORS"
ACTOR_CPUS_ENV = "CLINBUNDLE_RAY_ACTOR_CPUS"
# Half a CPU per actor by default: on a small node a pool that claims every CPU leaves none for
# Ray Data's own tasks and the pipeline stalls ("backpressured"); compute is set by `threads`.
DEFAULT_ACTOR_CPUS = 0.5


def case_to_json(case: Case) -> str:
    """A case as one string column (Arrow has no Path type; JSON keeps it plain data)."""
    files = [str(Path(f).resolve()) for f in case.files]  # a worker's cwd is not ours
    return json.dumps({"case_id": case.case_id, "kind": case.kind, "files": files,
                       "content_hash": case.content_hash})  # fmt: skip


def case_from_json(text: str) -> Case:
    d = json.loads(text)
    return Case(d["case_id"], d["kind"], tuple(Path(f) for f in d["files"]), d["content_hash"])


def _plain(value: object) -> object:
    """numpy scalars in a row as Python numbers (JSON has no numpy types)."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"a table row holds a {type(value).__name__}")


class CasePredictor:
    """One Ray actor: the model opened once, then one case per call."""

    def __init__(self, spec: ModelSpec, output_dir: str) -> None:
        logging.basicConfig(level=logging.INFO)
        self.model = open_model(spec)
        self.output_dir = Path(output_dir)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[str]]:
        from clinbundle.cohort.job import predict_case

        rows = [
            predict_case(self.model, case_from_json(str(c)), self.output_dir) for c in batch["case"]
        ]
        return {"row": [json.dumps(r, default=_plain) for r in rows]}


def _env_number(name: str, kind: type, minimum: float) -> float | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    try:
        value = kind(raw)
    except ValueError:
        raise ClinbundleError(f"{name}={raw!r} is not a number") from None
    if value < minimum:
        raise ClinbundleError(f"{name} must be >= {minimum}, got {raw}")
    return value


def plan_pool(n_cases: int, spec: ModelSpec, cluster: dict[str, float]) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor), each decision logged with its reason."""
    cpus = _env_number(ACTOR_CPUS_ENV, float, 0.01) or DEFAULT_ACTOR_CPUS
    have_gpus = cluster.get("GPU", 0.0)
    if spec.device == "cuda" and not have_gpus:
        raise DeviceError("--device cuda was asked for, but the Ray cluster has no GPU")
    gpus = 1.0 if spec.device == "cuda" or (spec.device == "auto" and have_gpus) else 0.0
    asked = _env_number(ACTORS_ENV, int, 1)
    if asked is not None:
        actors, why = int(asked), f"${ACTORS_ENV}"
    elif gpus:
        actors, why = int(have_gpus), "one per GPU"
    else:  # one per whole CPU, spread over the nodes (Ray Data's default placement)
        actors, why = max(1, math.floor(cluster.get("CPU", 1.0))), "one per CPU of the cluster"
    actors = max(1, min(actors, n_cases))
    log.info(
        "Ray pool: %d actor(s) (%s, at most one per case), %g CPU and %g GPU each (device %s)",
        actors, why, cpus, gpus, spec.device,
    )  # fmt: skip
    return actors, cpus, gpus


def run_on_ray(
    cases: list[Case], spec: ModelSpec, output_dir: Path, address: str | None
) -> Iterator[dict]:
    """Every case's row as it lands, each case exactly once (see the module docstring)."""
    if not cases:
        return
    ray = import_ray()
    output_dir = Path(output_dir).resolve()
    bundle = Path(spec.bundle).resolve() if spec.bundle else None
    spec = replace(spec, bundle=bundle, workdir=Path(spec.workdir).resolve())
    # a worker of a cluster does not inherit this process's environment: the tracking server
    # that `--model models:/...` resolves against and the runtime choice go with the job (the
    # manifest's key holds the runtime the driver opened; the actors must open the same)
    forwarded = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "CLINBUNDLE_RUNTIME")
    env = {k: os.environ[k] for k in forwarded if os.environ.get(k)}
    with ray_session(address, env=env) as cluster:
        actors, cpus, gpus = plan_pool(len(cases), spec, cluster)
        threads = spec.threads or max(1, math.floor(cpus))
        if spec.threads is None:
            log.info("Ray pool: %d runtime thread(s) per actor (from its CPUs)", threads)
        items = [{"case": case_to_json(c)} for c in cases]
        ds = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            CasePredictor,
            fn_constructor_kwargs={
                "spec": replace(spec, threads=threads),
                "output_dir": str(output_dir),
            },
            batch_size=1,
            compute=ray.data.ActorPoolStrategy(min_size=actors, max_size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=-1,  # a killed actor comes back (on a live node) ...
            max_task_retries=-1,  # ... and the case it held is run again
        )
        wanted = {c.case_id: c for c in cases}
        seen: set[tuple[str, str]] = set()
        for item in ds.iter_rows():
            row = json.loads(item["row"])
            key = (row["case_id"], row["content_hash"])
            if key in seen or row["case_id"] not in wanted:
                log.info("%s: a retried copy of a finished case, dropped", row["case_id"])
                continue
            seen.add(key)
            yield row | {"input": wanted[row["case_id"]].input}  # as the driver names it
    remove_stale_temps(output_dir)  # a killed actor's half-written file; its case was redone
    lost = [c.case_id for c in cases if (c.case_id, c.content_hash) not in seen]
    if lost:  # not seen with Ray's retries; the manifest keeps every row that did come back
        raise ClinbundleError(
            f"no result came back from Ray for {len(lost)} case(s) ({', '.join(lost[:5])}); "
            "run the same command again to finish them"
        )
