from __future__ import annotations

import numpy as np
import pytest

from clinbundle.training.metrics import DIRECTIONS, cldice, is_better, segmentation_metrics


def _tube(shape=(32, 32, 32), r=3, offset=0) -> np.ndarray:
    _, y, x = np.indices(shape)
    return (((y - 16 - offset) ** 2 + (x - 16) ** 2) <= r * r).astype(np.uint8)


def test_perfect_prediction() -> None:
    t = _tube()
    m = segmentation_metrics(t, t, 2, (1.0, 1.0, 1.0))
    assert m["dice"] == pytest.approx(1) and m["cldice"] == pytest.approx(1)
    assert m["masd"] == pytest.approx(0) and m["hd95"] == pytest.approx(0)
    assert m["compound"] == pytest.approx(1)


def test_shifted_prediction_is_worse_in_every_metric() -> None:
    ref = _tube()
    good = segmentation_metrics(_tube(offset=1), ref, 2, (1.0, 1.0, 1.0))
    bad = segmentation_metrics(_tube(offset=4), ref, 2, (1.0, 1.0, 1.0))
    for k in ("dice", "cldice", "masd", "hd95", "compound"):
        assert is_better(k, good[k], bad[k]), (k, good[k], bad[k])


def test_spacing_scales_distances() -> None:
    ref, pred = _tube(), _tube(offset=2)
    a = segmentation_metrics(pred, ref, 2, (1.0, 1.0, 1.0))
    b = segmentation_metrics(pred, ref, 2, (2.0, 2.0, 2.0))
    assert b["masd"] == pytest.approx(2 * a["masd"], rel=1e-3)


def test_empty_prediction_stays_finite() -> None:
    ref = _tube()
    m = segmentation_metrics(np.zeros_like(ref), ref, 2, (1.0, 1.0, 1.0))
    assert m["dice"] == 0 and m["cldice"] == 0
    assert np.isfinite(m["masd"]) and m["masd"] == pytest.approx(np.sqrt(3) * 32, rel=1e-3)


def test_cldice_edge_cases_and_directions() -> None:
    z = np.zeros((8, 8, 8), bool)
    assert cldice(z, z) == 1.0
    assert set(DIRECTIONS.values()) == {"min", "max"} and DIRECTIONS["compound"] == "max"
    assert is_better("masd", 1.0, 2.0) and not is_better("dice", 0.5, 0.6)
    assert is_better("dice", 0.1, None) and not is_better("dice", float("nan"), None)


def test_metric_registry_defines_each_metric_once_and_takes_custom_ones() -> None:
    from clinbundle import metric_definitions as M
    from clinbundle.runtime.errors import ConfigError

    assert M.get("masd").format(1.23456) == "1.235 mm" and M.get("dice").unit == ""
    assert all(m.description for m in M.all_metrics())
    with pytest.raises(ConfigError, match="already defined"):
        M.register(M.MetricDef("dice", "max", "", ".4f", "again", lambda c: 0.0))
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        M.get("nope")
    volume = M.MetricDef("pred_volume_ml", "max", "ml", ".2f", "predicted volume", lambda c: _ml(c))
    M.register(volume)
    try:
        t = _tube()
        m = segmentation_metrics(t, t, 2, (0.5, 0.5, 0.5))  # the loop computes it like the rest
        assert m["pred_volume_ml"] == pytest.approx(t.sum() * 0.125 / 1000)
        assert "pred_volume_ml" in M.directions() and "pred_volume_ml" not in DIRECTIONS
    finally:
        M.unregister("pred_volume_ml")


def _ml(case) -> float:
    return float((case.pred > 0).sum() * np.prod(case.spacing) / 1000)
