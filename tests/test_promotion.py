"""Promotion is gated on held-out metrics, and the reasons are recorded on both versions."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from clinbundle.registry import CHALLENGER, CHAMPION, promote, register_challenger
from clinbundle.runtime.networks import build_network
from clinbundle.servable import log_segmentation_model
from clinbundle.tracking import experiment_id

NAME = "promotion-test"


def tracking_workdir():
    return Path(mlflow.get_tracking_uri().removeprefix("sqlite:///")).parent


def _register_untrained(contract) -> str:
    torch.manual_seed(123)
    weights = build_network(contract.network).state_dict()
    exp = experiment_id("tests", tracking_workdir())
    with mlflow.start_run(experiment_id=exp, run_name="untrained"):
        info = log_segmentation_model(weights, contract)
    return register_challenger(info.model_uri, NAME)


def _alias(alias: str) -> str:
    return str(MlflowClient().get_model_version_by_alias(NAME, alias).version)


def test_worse_challenger_loses_better_one_wins(tracking) -> None:
    client = MlflowClient()
    contract = tracking.state.contract

    # an untrained model misses a demanding minimum: no champion yet
    v_bad = _register_untrained(contract)
    d = promote(NAME, tracking.data, metric="dice", minimum=0.99)
    assert not d.promoted and "misses the minimum" in d.reason
    assert client.get_model_version(NAME, v_bad).tags["promotion_decision"] == "rejected"

    # with no minimum it becomes the first champion
    d = promote(NAME, tracking.data, metric="dice", minimum=0.0)
    assert d.promoted and _alias(CHAMPION) == v_bad

    # the trained model, registered as challenger, is better and takes champion
    v_good = register_challenger(tracking.state.extra["model_uri"], NAME)
    d = promote(NAME, tracking.data, metric="dice")
    assert d.promoted, d.reason
    assert d.challenger.mean > d.champion.mean
    assert _alias(CHAMPION) == v_good
    good_tags = client.get_model_version(NAME, v_good).tags
    bad_tags = client.get_model_version(NAME, v_bad).tags
    assert good_tags["promotion_decision"] == "promoted"
    assert good_tags["promotion_champion_version"] == v_bad
    assert bad_tags["promotion_decision"] == "replaced"
    lo, hi = map(float, good_tags["promotion_ci95"].split(","))
    assert lo <= float(good_tags["promotion_mean"]) <= hi
    assert "paired difference 95% CI" in good_tags["promotion_reason"]

    # another untrained challenger does not take champion; the champion's tags say why
    v_worse = _register_untrained(contract)
    d = promote(NAME, tracking.data, metric="masd")
    assert not d.promoted
    assert _alias(CHAMPION) == v_good and _alias(CHALLENGER) == v_worse
    assert client.get_model_version(NAME, v_worse).tags["promotion_decision"] == "rejected"
    assert client.get_model_version(NAME, v_good).tags["promotion_decision"] == "kept"
    assert client.get_model_version(NAME, v_good).tags["promotion_metric"] == "masd"
