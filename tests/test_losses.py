"""cbDice against values computed by hand on tiny volumes; the compound loss trains (fast)."""

from __future__ import annotations

import pytest
import torch

from clinbundle.runtime.errors import ConfigError
from clinbundle.training.cbdice import foreground, soft_cbdice
from clinbundle.training.config import LossConfig
from clinbundle.training.losses import LOSSES, build_loss


def _line(length: int = 7, upto: int | None = None, value: float = 1.0) -> torch.Tensor:
    """A 1-voxel-wide line along the first axis of a (1, 1, length, 5, 5) volume."""
    v = torch.zeros(1, 1, length, 5, 5)
    v[0, 0, : (length if upto is None else upto), 2, 2] = value
    return v


def test_perfect_prediction_scores_one() -> None:
    assert float(soft_cbdice(_line(), _line())) == pytest.approx(1.0)


def test_truncated_thin_vessel_by_hand() -> None:
    """Truth: a 7-voxel line. Prediction: its first 4 voxels. On a 1-voxel line the soft
    skeleton is the line itself, every distance to the boundary is 1, so every radius is 1 and
    every weight is 1. With smooth = 1:
        Tprec = (4 + 1) / (4 + 1) = 1            (the predicted skeleton lies inside the truth)
        Tsens = (4 + 1) / (4 + 3 + 1) = 5/8      (3 truth-skeleton voxels have no prediction)
        cbDice = 2 * 1 * 5/8 / (1 + 5/8) = 10/13
    """
    assert float(soft_cbdice(_line(upto=4), _line())) == pytest.approx(10 / 13, abs=1e-6)


def test_uncertain_but_right_is_not_penalised_like_wrong() -> None:
    """Probability 0.8 on the true line: the 0.8 multiplies both the numerator and the
    denominator's matched term, so cbDice stays 1 (its job is geometry, Dice/CE handle calibration)."""
    assert float(soft_cbdice(_line(value=0.8), _line())) == pytest.approx(1.0, abs=1e-6)


def test_thin_vessel_miss_costs_more_than_missing_thick_vessel_boundary() -> None:
    """Diameter imbalance (the paper's motivation): a thick tube plus a thin branch. Dropping the
    thin branch entirely must cost more than losing the thick tube's outer layer."""
    truth = torch.zeros(1, 1, 16, 16, 16)
    _, y, x = torch.meshgrid(*[torch.arange(16)] * 3, indexing="ij")
    thick = ((y - 5) ** 2 + (x - 5) ** 2) <= 9
    thin = (y == 12) & (x == 12)
    truth[0, 0] = (thick | thin).float()
    no_thin = (thick.float())[None, None]
    thinner = ((((y - 5) ** 2 + (x - 5) ** 2) <= 4) | thin).float()[None, None]
    assert float(soft_cbdice(no_thin, truth)) < float(soft_cbdice(thinner, truth))


def test_compound_loss_is_differentiable_and_decreases() -> None:
    torch.manual_seed(0)
    target = _line(length=8).long()
    target = torch.nn.functional.pad(target, (0, 3, 0, 3, 0, 0))  # (1, 1, 8, 8, 8)
    logits = torch.zeros(1, 2, 8, 8, 8, requires_grad=True)
    loss_fn = build_loss(LossConfig(name="cbdice_cldice"))
    opt = torch.optim.Adam([logits], lr=0.1)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = loss_fn(logits, target)
        loss.backward()
        first = first if first is not None else loss.item()
        opt.step()
    assert float(loss) < 0.5 * first
    assert (foreground(logits)[0, 0] > 0.5).eq(target[0, 0] > 0).all()


def test_shared_skeleton_cldice_equals_monai_soft_cldice() -> None:
    from monai.losses import SoftclDiceLoss

    from clinbundle.training.cbdice import skeletons, soft_cldice

    torch.manual_seed(1)
    logits = torch.randn(2, 2, 12, 12, 12)
    target = (torch.rand(2, 1, 12, 12, 12) > 0.7).long()
    monai = SoftclDiceLoss(iter_=3, softmax=True, to_onehot_y=True, include_background=False)
    fg, truth = foreground(logits), (target > 0).float()
    ours = 1.0 - soft_cldice(fg, truth, skeletons(fg, truth, 3))
    assert float(ours) == pytest.approx(float(monai(logits, target)), abs=1e-6)


def test_unknown_loss_names_the_choices() -> None:
    assert "cbdice_cldice" in LOSSES
    with pytest.raises(ConfigError, match="cbdice_cldice"):
        build_loss(LossConfig(name="nope"))
