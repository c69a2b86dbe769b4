"""A fold ensemble as one registered model: `clinbundle ensemble --from GRID_OR_RUNS`.

The members' weights go into one `EnsembleNet` (clinbundle/runtime/networks.py) whose contract
lists them, so the ensemble is logged, registered, served and packaged exactly like a single
model (one pyfunc, one ONNX graph, parity against the PyTorch ensemble). Members must share
everything in the contract but their networks: an average of models that see different grids,
intensities or labels has no meaning, so such a set is refused with the fields named.

    --from  RUN_ID[,RUN_ID...] | models:/NAME/VERSION[,...] | runs:/RUN_ID/model | GRID_RUN_ID
            (a grid's children are the runs MLflow tagged mlflow.parentRunId = GRID_RUN_ID)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from clinbundle.packaging.model_source import ResolvedModel, resolve_model
from clinbundle.registry import PRODUCTION_TAG, register_challenger
from clinbundle.runtime.contract import (
    EnsembleMember,
    EnsembleSpec,
    InferenceContract,
    NetworkSpec,
)
from clinbundle.runtime.errors import ModelResolutionError
from clinbundle.runtime.hashing import sha256_file
from clinbundle.runtime.networks import build_network, spatial_divisor
from clinbundle.servable import log_segmentation_model
from clinbundle.tracking import child_runs

log = logging.getLogger("clinbundle.ensemble")

KIND_TAG = "clinbundle.kind"
#: contract fields that may differ between members (the ensemble's own values replace them)
MEMBER_OWN = ("network", "spatial_divisor")


@dataclass
class Ensemble:
    run_id: str
    name: str
    version: str
    contract: InferenceContract
    members: list[ResolvedModel]


def member_uris(sources: str) -> list[str]:
    """`--from` as a list of model URIs; a run id with child runs stands for its children."""
    items = [s.strip() for s in sources.split(",") if s.strip()]
    if not items:
        raise ModelResolutionError("--from is empty: give run ids, models:/ URIs or a grid run id")
    client, uris = MlflowClient(), []
    for item in items:
        if item.startswith(("models:/", "runs:/")):
            uris.append(item)
            continue
        try:
            run = client.get_run(item)
        except MlflowException:
            raise ModelResolutionError(
                f"--from: '{item}' is neither a models:/ or runs:/ URI nor a run id at "
                f"{mlflow.get_tracking_uri()}"
            ) from None
        children = child_runs(client, run, finished_only=True)
        if children:
            log.info("run %s is a grid: its %d finished child runs", item, len(children))
        uris += [f"runs:/{r.info.run_id}/model" for r in children] or [f"runs:/{item}/model"]
    if len(set(uris)) != len(uris):
        raise ModelResolutionError(f"--from names a member twice: {uris}")
    if len(uris) < 2:
        raise ModelResolutionError(f"an ensemble needs at least two members; --from gave {uris}")
    return uris


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_shared_contract(members: list[ResolvedModel]) -> None:
    """Refuse members whose contracts differ outside their networks, naming every field."""
    flat = [_flat(m.contract.model_dump(mode="json", exclude=set(MEMBER_OWN))) for m in members]
    first = members[0]
    problems = []
    for m, f in zip(members[1:], flat[1:], strict=True):
        for key in sorted(set(flat[0]) | set(f)):
            if flat[0].get(key) != f.get(key):
                problems.append(
                    f"{key}: {flat[0].get(key)!r} ({first.label}) != {f.get(key)!r} ({m.label})"
                )
    if problems:
        raise ModelResolutionError(
            "the members do not share one inference contract, so their probabilities cannot "
            "be averaged:\n  " + "\n  ".join(problems)
        )


def checkpoint_of(m: ResolvedModel) -> str:
    """Where in its run the member's weights came from (older models name only the metric)."""
    sel = m.metadata.get("selection_metric")
    path = m.metadata.get("checkpoint") or (f"checkpoints/best_{sel}.pt" if sel else None)
    return f"runs:/{m.run_id}/{path}" if path else f"{m.uri} (artifacts/weights.pt)"


def ensemble_contract(members: list[ResolvedModel], mirror_axes: list[int]) -> InferenceContract:
    """The members' shared contract with the ensemble as its network."""
    try:
        spec = EnsembleSpec(
            members=[
                EnsembleMember(
                    network=m.contract.network,
                    model_uri=f"models:/{m.name}/{m.version}" if m.version else m.uri,
                    run_id=m.run_id,
                    model_version=m.version,
                    checkpoint=checkpoint_of(m),
                    weights_sha256=sha256_file(m.weights_path),
                )
                for m in members
            ],
            mirror_axes=mirror_axes,
        )
        network = NetworkSpec(family="Ensemble", kwargs=spec.model_dump(mode="json"))
        shared = members[0].contract.model_dump(mode="json")
        return InferenceContract.model_validate(
            shared | {"network": network.model_dump(), "spatial_divisor": spatial_divisor(network)}
        )
    except ValidationError as e:
        why = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ModelResolutionError(f"the members cannot form one ensemble: {why}") from None


def merged_weights(members: list[ResolvedModel], contract: InferenceContract) -> dict:
    """One state dict (`members.<i>.<key>`), checked to load strictly into the ensemble."""
    state = {}
    for i, m in enumerate(members):
        weights = torch.load(m.weights_path, map_location="cpu", weights_only=True)
        state |= {f"members.{i}.{k}": v for k, v in weights.items()}
    build_network(contract.network).load_state_dict(state)  # raises on any mismatch
    return state


def _shared_params(members: list[ResolvedModel]) -> dict[str, str]:
    """Run params all members agree on (data, loss, schedule), for the run page and the card."""
    common = dict(members[0].run_params)
    for m in members[1:]:
        common = {k: v for k, v in common.items() if m.run_params.get(k) == v}
    folds = ",".join(m.run_params.get("data_fold", "?") for m in members)
    return common | {"data_fold": folds}


def build_ensemble(
    sources: str, cache_dir: Path, name: str | None = None, mirror_axes: list[int] | None = None
) -> Ensemble:
    """Resolve and check the members, log the ensemble as one pyfunc and register it
    (@challenger, so `promote` weighs it against the champion like any model)."""
    members = [resolve_model(u, cache_dir) for u in member_uris(sources)]
    runs = [m.run_id for m in members]
    if len(set(runs)) < len(runs):
        raise ModelResolutionError(f"--from names the model of one run twice (runs {runs})")
    check_shared_contract(members)
    names = {m.name for m in members}
    name = name or (names.pop() if len(names) == 1 and None not in names else None)
    if name is None:
        raise ModelResolutionError(
            "the members are not versions of one registered model; name the ensemble's "
            "registered model with --name"
        )
    contract = ensemble_contract(members, sorted(mirror_axes or []))
    state = merged_weights(members, contract)
    spec = contract.network.ensemble
    assert spec is not None
    experiment = MlflowClient().get_run(members[0].run_id).info.experiment_id
    uris = [m.model_uri for m in spec.members]
    with mlflow.start_run(experiment_id=experiment, run_name=f"ensemble-of-{len(members)}") as run:
        mlflow.set_tags({KIND_TAG: "ensemble", "model_family": "Ensemble"})
        mlflow.log_params(
            _shared_params(members)
            | {
                "ens_members": len(members),
                "ens_mirror_axes": spec.mirror_axes,
                "ens_forward_passes": spec.forward_passes,
            }
        )
        mlflow.log_text(contract.to_json(), "config/inference_contract.json")
        info = log_segmentation_model(
            state,
            contract,
            metadata={
                "run_id": run.info.run_id,
                "ensemble_members": uris,
                "forward_passes_per_patch": spec.forward_passes,
                **_shared_metadata(members),
            },
        )
        version = register_challenger(
            info.model_uri,
            name,
            run_id=run.info.run_id,
            tags={
                KIND_TAG: "ensemble",
                "ensemble_members": ",".join(uris),
                "ensemble_forward_passes": str(spec.forward_passes),
            }
            | _production(members),
        )
    log.info("ensemble of %s registered as %s v%s", ", ".join(uris), name, version)
    return Ensemble(run.info.run_id, name, version, contract, members)


def _production(members: list[ResolvedModel]) -> dict[str, str]:
    """A member trained on everything (no validation) makes the ensemble unpromotable too."""
    hit = any(m.version_tags.get(PRODUCTION_TAG) == "true" for m in members)
    return {PRODUCTION_TAG: "true"} if hit else {}


def _shared_metadata(members: list[ResolvedModel]) -> dict:
    sha = {m.metadata.get("dataset_sha256") for m in members}
    return {"dataset_sha256": sha.pop()} if len(sha) == 1 else {}
