"""Planning a grid from the command line (fast: no training)."""

from __future__ import annotations

import pytest

from clinbundle.runtime.errors import ConfigError
from clinbundle.training.grid import parse_folds, plan, split_values, sweeps


def test_commas_inside_brackets_do_not_split() -> None:
    assert split_values("dice_ce,cbdice_cldice") == ["dice_ce", "cbdice_cldice"]
    assert split_values("[8,16,32]") == ["[8,16,32]"]
    assert split_values("[8,16],[16,32]") == ["[8,16]", "[16,32]"]
    fixed, swept = sweeps(["model.filters=[8,16]", "loss.name=a,b", "train.epochs=2"])
    assert fixed == ["model.filters=[8,16]", "train.epochs=2"] and swept == {
        "loss.name": ["a", "b"]
    }


def test_losses_cross_folds_and_each_trial_is_its_config() -> None:
    base, trials, swept = plan(None, ["data.folds=3", "loss.name=dice_ce,cbdice_cldice"], "all")
    assert base.data.folds == 3 and swept["data.fold"] == ["0", "1", "2"]
    assert [t.name for t in trials] == [
        f"loss={loss}-fold={f}" for loss in ("dice_ce", "cbdice_cldice") for f in range(3)
    ]
    assert trials[4].overrides == ("data.folds=3", "loss.name=cbdice_cldice", "data.fold=1")


def test_bad_grids_fail_before_any_training() -> None:
    with pytest.raises(ConfigError, match="unknown loss 'nope'"):
        plan(None, ["loss.name=dice_ce,nope"], None)
    with pytest.raises(ConfigError, match="in 0..1"):
        parse_folds("0,2", 2)
    with pytest.raises(ConfigError, match="'all' or fold numbers"):
        parse_folds("first", 2)
    with pytest.raises(ConfigError, match="a grid needs"):
        plan(None, ["train.epochs=2"], None)
    with pytest.raises(ConfigError, match="invalid configuration"):
        plan(None, ["train.epochs=2,-1"], None)
