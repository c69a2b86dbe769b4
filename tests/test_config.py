from __future__ import annotations

from pathlib import Path

import pytest

from clinbundle.runtime.errors import ConfigError
from clinbundle.runtime.networks import build_network, network_spec, spatial_divisor
from clinbundle.training.config import load_config
from clinbundle.training.losses import build_loss


def test_defaults_and_overrides() -> None:
    cfg = load_config(
        overrides=["train.epochs=7", "compute.patch_size=[32,48,64]", "train.lr=1e-4"]
    )
    assert cfg.train.epochs == 7
    assert cfg.compute.patch_size == (32, 48, 64)
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.name == "dynunet" and cfg.loss.name == "dice_ce"
    assert cfg.compute.device == "auto" and cfg.compute.batch_size == "auto"


def test_compute_auto_shorthand(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("compute: auto\ntrain: {epochs: 2}\n")
    cfg = load_config(f)
    assert cfg.compute.device == "auto" and cfg.compute.patch_size == "auto"
    assert cfg.train.epochs == 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.epochs=-1", "train.epochs"),
        ("train.nope=1", "train.nope"),
        ("nosection.x=1", "nosection"),
        ("compute.device=tpu", "compute.device"),
        ("train.epochs", "key=value"),
    ],
)
def test_bad_overrides_name_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(overrides=[override])


def test_bad_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("name", ["dynunet", "segresnet", "unet"])
def test_networks_by_name_run_on_their_divisor(name: str) -> None:
    import torch

    spec = network_spec(name, 1, 2, [8, 16, 32])
    d = spatial_divisor(spec)
    net = build_network(spec).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 1, 2 * d, 2 * d, 3 * d))
    assert out.shape == (1, 2, 2 * d, 2 * d, 3 * d)


def test_unknown_model_and_loss_names() -> None:
    with pytest.raises(ConfigError, match="unknown model 'vnet'.*dynunet"):
        network_spec("vnet", 1, 2)
    cfg = load_config(overrides=["loss.name=focal"])
    with pytest.raises(ConfigError, match="unknown loss 'focal'.*cldice"):
        build_loss(cfg.loss)


def test_cldice_loss_trains_a_step() -> None:
    import torch

    loss = build_loss(load_config(overrides=["loss.name=cldice"]).loss)
    logits = torch.randn(2, 2, 16, 16, 16, requires_grad=True)
    target = (torch.rand(2, 1, 16, 16, 16) > 0.8).float()
    value = loss(logits, target)
    value.backward()
    assert torch.isfinite(value) and logits.grad is not None


def test_device_choice_is_logged_and_cuda_fails_loudly_when_absent() -> None:
    import torch

    from clinbundle.runtime.errors import DeviceError
    from clinbundle.training.compute import resolve_compute, resolve_device
    from clinbundle.training.config import ComputeConfig

    comp = resolve_compute(ComputeConfig(), (40, 50, 60), 40 * 50 * 60 * 4, 8)
    assert comp.decisions["device"].auto and comp.decisions["device"].reason
    assert comp.patch_size == (40, 48, 56) and all(p % 8 == 0 for p in comp.patch_size)
    user = resolve_compute(ComputeConfig(device="cpu", batch_size=3), (64, 64, 64), 1, 8)
    assert user.batch_size == 3 and not user.decisions["batch_size"].auto
    if torch.cuda.is_available():
        assert resolve_device("cuda")[0].type == "cuda"
    else:
        with pytest.raises(DeviceError, match="no CUDA device"):
            resolve_device("cuda")
