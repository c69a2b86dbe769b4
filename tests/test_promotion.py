"""Promotion is gated on held-out metrics, and the reasons are recorded on both versions."""

from __future__ import annotations

from pathlib import Path

import mlflow
import torch
from mlflow.tracking import MlflowClient

from clinbundle.cli import main
from clinbundle.registry import (
    CHALLENGER,
    CHAMPION,
    RULE_MIN_VOLUMES,
    RULE_PAIRED_CI,
    decide,
    load_eval_set,
    promote,
    register_challenger,
    score_version,
)
from clinbundle.runtime.networks import build_network
from clinbundle.servable import log_segmentation_model
from clinbundle.tracking import experiment_id

NAME = "promotion-test"


def tracking_workdir():
    return Path(mlflow.get_tracking_uri().removeprefix("sqlite:///")).parent


def _register_untrained(contract, name: str = NAME) -> str:
    torch.manual_seed(123)
    weights = build_network(contract.network).state_dict()
    exp = experiment_id("tests", tracking_workdir())
    with mlflow.start_run(experiment_id=exp, run_name="untrained"):
        info = log_segmentation_model(weights, contract)
    return register_challenger(info.model_uri, name)


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
    assert good_tags["promotion_rule"] == RULE_PAIRED_CI
    dlo, dhi = map(float, good_tags["promotion_difference_ci95"].split(","))
    assert 0 < dlo <= dhi

    # another untrained challenger does not take champion; the champion's tags say why
    v_worse = _register_untrained(contract)
    d = promote(NAME, tracking.data, metric="masd")
    assert not d.promoted
    assert _alias(CHAMPION) == v_good and _alias(CHALLENGER) == v_worse
    assert client.get_model_version(NAME, v_worse).tags["promotion_decision"] == "rejected"
    assert client.get_model_version(NAME, v_good).tags["promotion_decision"] == "kept"
    assert client.get_model_version(NAME, v_good).tags["promotion_metric"] == "masd"


def test_better_mean_whose_ci_does_not_clear_the_margin_is_not_promoted(tracking) -> None:
    """Real models on the real held-out set: the trained challenger beats an untrained champion
    on mean Dice; with a margin between the paired CI's lower bound and the mean difference the
    old rule (mean > margin) would promote it, the evidence rule does not, and says why."""
    name = "promotion-ci-test"
    client = MlflowClient()
    _register_untrained(tracking.state.contract, name)
    assert promote(name, tracking.data, metric="dice", minimum=0.0).promoted
    v_good = register_challenger(tracking.state.extra["model_uri"], name)
    eval_set = load_eval_set(tracking.data)
    champion_version = str(client.get_model_version_by_alias(name, CHAMPION).version)
    probe = decide(
        score_version(name, v_good, eval_set, "dice"),
        score_version(name, champion_version, eval_set, "dice"),
    )
    diff = probe.difference
    assert diff is not None and diff.low < diff.mean, probe.reason
    margin = (diff.low + diff.mean) / 2  # the mean clears it, the CI's lower bound does not

    d = promote(name, tracking.data, metric="dice", min_improvement=margin)
    assert not d.promoted and d.difference.mean > margin
    tags = client.get_model_version(name, v_good).tags
    assert tags["promotion_decision"] == "rejected" and tags["promotion_rule"] == RULE_PAIRED_CI
    assert "the mean is better, but the CI does not clear the margin" in tags["promotion_reason"]
    assert str(client.get_model_version_by_alias(name, CHAMPION).version) == champion_version


def test_too_few_volumes_refuse_to_decide(tracking, capsys) -> None:
    name = "promotion-volumes-test"
    _register_untrained(tracking.state.contract, name)
    n = len(load_eval_set(tracking.data)[0])
    args = ["promote", "--model", name, "--data", str(tracking.data), "--minimum", "0"]
    code = main([*args, "--min-volumes", str(n + 1), "--workdir", str(tracking.workdir)])
    assert code == 2
    assert f"{n} held-out volume(s), fewer than --min-volumes {n + 1}" in capsys.readouterr().err
    tags = MlflowClient().get_model_version(name, _alias_of(name, CHALLENGER)).tags
    assert tags["promotion_decision"] == "refused" and tags["promotion_rule"] == RULE_MIN_VOLUMES
    assert MlflowClient().get_registered_model(name).aliases.get(CHAMPION) is None


def _alias_of(name: str, alias: str) -> str:
    return str(MlflowClient().get_model_version_by_alias(name, alias).version)
