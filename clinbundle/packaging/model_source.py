"""Resolve `--model` to one registered model version and its inference contract.

Accepted forms: `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/RUN_ID/PATH`, a bare
version number (of the default name) or a bare name (its `@champion`). The model must carry
the inference contract that clinbundle writes into the MLflow model metadata; packaging reads
roi, overlap, normalisation and labels from there and nowhere else.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.tracking import MlflowClient

from clinbundle.runtime.contract import InferenceContract
from clinbundle.runtime.errors import ModelResolutionError
from clinbundle.runtime.networks import build_network

log = logging.getLogger("clinbundle.packaging")

DEFAULT_NAME = "vessel-seg"
_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-f]+)/(?P<path>.+)$")


@dataclass
class ResolvedModel:
    """One model version, downloaded, with what every format needs to know about it."""

    uri: str  # as the user gave it
    name: str | None
    version: str | None  # None for a runs:/ URI of a model that was never registered
    run_id: str
    contract: InferenceContract
    metadata: dict
    local_dir: Path
    version_tags: dict[str, str] = field(default_factory=dict)
    run_tags: dict[str, str] = field(default_factory=dict)
    run_params: dict[str, str] = field(default_factory=dict)
    run_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """`name v3` or `runs:/...` for messages and reports."""
        return f"{self.name} v{self.version}" if self.version else self.uri

    @property
    def weights_path(self) -> Path:
        return self.local_dir / "artifacts" / "weights.pt"

    def load_network(self) -> torch.nn.Module:
        """The PyTorch network in eval mode on the CPU: the reference every format is held to."""
        net = build_network(self.contract.network)
        state = torch.load(self.weights_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
        return net.eval()


def canonical_uri(spec: str | None, default_name: str = DEFAULT_NAME) -> str:
    """Turn the short forms of `--model` into an MLflow model URI."""
    spec = (spec or "").strip()
    if not spec:
        return f"models:/{default_name}@champion"
    if spec.isdigit():
        return f"models:/{default_name}/{spec}"
    if "://" not in spec and ":/" not in spec and "/" not in spec:
        return f"models:/{spec}@champion"
    return spec


def _registered_version(client: MlflowClient, uri: str) -> tuple[str, str]:
    m = _MODELS.match(uri)
    if m is None:
        raise ModelResolutionError(
            f"cannot parse model URI '{uri}': use models:/NAME@ALIAS, models:/NAME/VERSION, "
            "runs:/RUN_ID/model, a version number or a registered model name"
        )
    name = m["name"]
    try:
        client.get_registered_model(name)
    except MlflowException:
        known = sorted(r.name for r in client.search_registered_models(max_results=50))
        raise ModelResolutionError(
            f"no registered model named '{name}' at {mlflow.get_tracking_uri()}; "
            f"registered models: {', '.join(known) or 'none'} (train one, or check "
            "MLFLOW_TRACKING_URI / --workdir)"
        ) from None
    if m["alias"]:
        try:
            mv = client.get_model_version_by_alias(name, m["alias"])
        except MlflowException:
            aliases = sorted(client.get_registered_model(name).aliases)
            raise ModelResolutionError(
                f"model '{name}' has no alias @{m['alias']}; its aliases: "
                f"{', '.join('@' + a for a in aliases) or 'none'} "
                "(promote a version with `clinbundle promote`, or pass a version number)"
            ) from None
    else:
        try:
            mv = client.get_model_version(name, m["version"])
        except MlflowException:
            raise ModelResolutionError(f"model '{name}' has no version {m['version']}") from None
    return name, str(mv.version)


def resolve_model(
    spec: str | None, cache_dir: Path, default_name: str = DEFAULT_NAME
) -> ResolvedModel:
    """Resolve, download (into `cache_dir`) and check one model; clear errors otherwise."""
    uri = canonical_uri(spec, default_name)
    client = MlflowClient()
    name = version = None
    if uri.startswith("models:/"):
        name, version = _registered_version(client, uri)
        mv = client.get_model_version(name, version)
        run_id, version_tags = mv.run_id, dict(mv.tags)
        download_uri = f"models:/{name}/{version}"
    elif (r := _RUNS.match(uri)) is not None:
        run_id, version_tags, download_uri = r["run"], {}, uri
        hits = client.search_model_versions(f"run_id = '{run_id}'")
        if hits:
            name, version, version_tags = hits[0].name, str(hits[0].version), dict(hits[0].tags)
    else:
        raise ModelResolutionError(
            f"unsupported model URI '{uri}': use models:/NAME@ALIAS, models:/NAME/VERSION "
            "or runs:/RUN_ID/model"
        )
    local = _download(download_uri, cache_dir)
    meta = Model.load(str(local / "MLmodel")).metadata or {}
    if "inference_contract" not in meta:
        raise ModelResolutionError(
            f"{uri} has no inference contract in its MLflow metadata: it was not logged by "
            "clinbundle (clinbundle.servable.log_segmentation_model writes one)"
        )
    if not (local / "artifacts" / "weights.pt").is_file():
        raise ModelResolutionError(f"{uri} has no artifacts/weights.pt: not a clinbundle model")
    try:
        run = client.get_run(run_id)
        tags, params, metrics = dict(run.data.tags), dict(run.data.params), dict(run.data.metrics)
    except MlflowException:
        tags, params, metrics = {}, {}, {}
    resolved = ResolvedModel(
        uri=uri,
        name=name,
        version=version,
        run_id=run_id,
        contract=InferenceContract.model_validate(meta["inference_contract"]),
        metadata=meta,
        local_dir=local,
        version_tags=version_tags,
        run_tags=tags,
        run_params=params,
        run_metrics=metrics,
    )
    log.info("resolved %s -> %s (run %s)", uri, resolved.label, run_id)
    return resolved


def _download(uri: str, cache_dir: Path) -> Path:
    """Download into a fresh temp folder, then move into place: no half-downloaded model."""
    key = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split(":/", 1)[1]).strip("_")
    target = cache_dir / key
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".download-", dir=cache_dir))
    try:
        path = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
    except MlflowException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelResolutionError(f"cannot download {uri}: {e.message}") from None
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelResolutionError(f"cannot download {uri}: {e}") from None
    if not (path / "MLmodel").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ModelResolutionError(f"{uri} is not an MLflow model (no MLmodel file)")
    shutil.rmtree(target, ignore_errors=True)
    path.rename(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return target


def validation_volumes(model: ResolvedModel, limit: int = 2) -> list[Path]:
    """Image paths of the run's validation split (its split.json), where they exist here.

    The split records absolute paths of the training machine; on another machine they may be
    missing, which is logged and leaves the synthetic parity cases to carry the check.
    """
    try:
        text = mlflow.artifacts.load_text(f"runs:/{model.run_id}/split.json")
    except (MlflowException, OSError):
        log.warning(
            "run %s has no split.json: parity runs without validation volumes", model.run_id
        )
        return []
    import json

    images = [Path(item["image"]) for item in json.loads(text).get("val", [])]
    found = [p for p in images if p.is_file()]
    if len(found) < len(images):
        log.warning(
            "%d of %d validation volumes of run %s are not on this machine",
            len(images) - len(found),
            len(images),
            model.run_id,
        )
    return found[:limit]
