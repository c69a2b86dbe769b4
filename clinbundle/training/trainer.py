"""The training loop, readable top to bottom.

    data -> validate -> resolve compute -> contract -> split -> model/loss/optim -> epochs
    (train, validate through the shared inference path, checkpoint) -> callbacks

Tracking is a callback (`clinbundle.training.tracking.MLflowCallback`); the loop only writes
files and announces them, so it runs the same with or without MLflow.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import set_determinism
from tqdm import tqdm

from clinbundle.contract import InferenceContract
from clinbundle.errors import ConfigError
from clinbundle.inference import sliding_window_probabilities, torch_predictor
from clinbundle.networks import build_network, network_spec, spatial_divisor
from clinbundle.training import data as D
from clinbundle.training.callbacks import Callback, CallbackList, TrainState
from clinbundle.training.checkpoint import atomic_save, atomic_write_bytes, rng_states
from clinbundle.training.compute import resolve_compute
from clinbundle.training.config import Config
from clinbundle.training.losses import build_loss
from clinbundle.training.metrics import DIRECTIONS, is_better, segmentation_metrics

log = logging.getLogger("clinbundle.train")


def build_contract(
    cfg: Config, num_classes: int, labels: dict[str, str], roi: tuple
) -> InferenceContract:
    spec = network_spec(cfg.model.name, 1, num_classes, cfg.model.filters)
    try:
        return InferenceContract(
            network=spec,
            in_channels=1,
            num_classes=num_classes,
            labels=labels,
            roi_size=roi,
            overlap=cfg.inference.overlap,
            blend_mode=cfg.inference.blend_mode,
            sw_batch_size=cfg.inference.sw_batch_size,
            spatial_divisor=spatial_divisor(spec),
            normalization=cfg.inference.normalization,
        )
    except ValueError as e:
        raise ConfigError(f"invalid inference settings: {e}") from None


def validate_epoch(
    model: torch.nn.Module,
    val_ds: CacheDataset,
    contract: InferenceContract,
    loss_fn: torch.nn.Module,
    device: torch.device,
    amp: bool,
    spacings: dict[str, tuple[float, ...]],
    pred_dir: Path,
) -> tuple[dict[str, float], list[Path]]:
    """Full-volume validation through the same sliding-window path every format uses.

    val_loss is the training loss of the blended softmax: it is fed log-probabilities, which
    softmax maps back to the same probabilities, so no second (logit) path is needed.
    """
    rows, files = [], []
    predictor = torch_predictor(model, amp=amp)
    for item in val_ds:
        image = item["image"].numpy()[None].astype(np.float32)
        label = item["label"].long()[None]
        probs = sliding_window_probabilities(predictor, image, contract, device=device)
        p = torch.from_numpy(probs)
        loss = float(loss_fn(torch.log(p.clamp_min(1e-8)), label))
        hard = probs[0].argmax(0).astype(np.uint8)
        case = item["case"]
        m = segmentation_metrics(hard, label[0, 0].numpy(), contract.num_classes, spacings[case])
        rows.append({"val_loss": loss, **m})
        out = pred_dir / f"{case}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, labels=hard, probabilities=probs[0].astype(np.float16))
        files.append(out)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, files


def train(cfg: Config, out_dir: Path, callbacks: list[Callback] | None = None) -> TrainState:
    cb = CallbackList(list(callbacks or []))

    # --- data, checked before anything expensive -------------------------------------------
    ds = D.validate_dataset(D.read_dataset(cfg.data.root))
    spec = network_spec(cfg.model.name, 1, ds.num_classes, cfg.model.filters)
    loss_fn = build_loss(cfg.loss)
    if cfg.train.selection_metric not in DIRECTIONS:
        raise ConfigError(
            f"train.selection_metric '{cfg.train.selection_metric}' is not one of {list(DIRECTIONS)}"
        )
    divisor = spatial_divisor(spec)
    comp = resolve_compute(cfg.compute, ds.min_shape, ds.total_voxels, divisor)
    if any(p % divisor for p in comp.patch_size):
        raise ConfigError(
            f"patch size {list(comp.patch_size)} must be a multiple of {divisor} for "
            f"{spec.family} with {len(cfg.model.filters)} levels"
        )
    D.check_patch_fits(ds, comp.patch_size)
    roi = comp.patch_size if cfg.inference.roi_size == "auto" else cfg.inference.roi_size
    contract = build_contract(cfg, ds.num_classes, ds.labels, tuple(roi))
    split = D.kfold_split(ds.training, cfg.data.folds, cfg.data.fold, cfg.train.seed)

    # --- deterministic set-up -----------------------------------------------------------------
    set_determinism(seed=cfg.train.seed)
    device, amp = comp.device, comp.amp
    train_tf = D.train_transforms(
        comp.patch_size, cfg.data.samples_per_volume, contract.normalization
    )
    train_tf.set_random_state(seed=cfg.train.seed)
    train_ds = CacheDataset(split["train"], train_tf, cache_rate=comp.cache_rate, progress=False)
    val_ds = CacheDataset(
        split["val"], D.val_transforms(), cache_rate=comp.cache_rate, progress=False
    )
    loader = DataLoader(
        train_ds,
        batch_size=comp.batch_size,
        shuffle=True,
        num_workers=cfg.data.num_workers,
        generator=torch.Generator().manual_seed(cfg.train.seed),
    )
    spacings = {it["case"]: sp for it, sp in zip(ds.training, ds.spacings, strict=False)}

    model = build_network(spec).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=max(cfg.train.epochs, 1), eta_min=cfg.train.lr / 100
    )
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    out_dir.mkdir(parents=True, exist_ok=True)
    state = TrainState(cfg, contract, ds, comp, split, out_dir)
    state.num_parameters = sum(p.numel() for p in model.parameters())
    ckpt_dir = out_dir / "checkpoints"

    def announce(path: Path, artifact_dir: str) -> None:
        cb.on_artifact(state, path, artifact_dir)

    try:
        cb.on_train_begin(state)
        split_file = atomic_write_bytes(
            json.dumps(split, indent=2).encode(), out_dir / "split.json"
        )
        announce(split_file, "")
        for epoch in range(1, cfg.train.epochs + 1):
            state.epoch = epoch
            model.train()
            t0, losses = time.perf_counter(), []
            bar = tqdm(
                loader, desc=f"epoch {epoch}/{cfg.train.epochs}", leave=False, dynamic_ncols=True
            )
            for batch in bar:
                x, y = batch["image"].to(device), batch["label"].to(device)
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast(device.type, enabled=amp):
                    loss = loss_fn(model(x), y)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{losses[-1]:.4f}")
            scheduler.step()
            metrics = {
                "train_loss": float(np.mean(losses)),
                "lr": scheduler.get_last_lr()[0],
                "epoch_seconds": time.perf_counter() - t0,
            }

            if epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs:
                val, pred_files = validate_epoch(
                    model,
                    val_ds,
                    contract,
                    loss_fn,
                    device,
                    amp,
                    spacings,
                    out_dir / "val_predictions",
                )
                metrics |= val
                for name in DIRECTIONS:
                    if is_better(name, val[name], state.best.get(name)):
                        state.best[name], state.best_epoch[name] = val[name], epoch
                        path = atomic_save(
                            {
                                "model": model.state_dict(),
                                "epoch": epoch,
                                "metric": name,
                                "value": val[name],
                                "contract": contract.model_dump(mode="json"),
                            },
                            ckpt_dir / f"best_{name}.pt",
                        )
                        announce(path, "checkpoints")
                        if name == cfg.train.selection_metric:
                            for f in pred_files:
                                announce(f, "val_predictions")
            state.history.append({"epoch": epoch, **metrics})
            last = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": rng_states(),
                "epoch": epoch,
                "config": cfg.model_dump(mode="json"),
                "contract": contract.model_dump(mode="json"),
            }
            announce(atomic_save(last, ckpt_dir / "last.pt"), "checkpoints")
            hist = json.dumps({"directions": DIRECTIONS, "history": state.history}, indent=2)
            announce(atomic_write_bytes(hist.encode(), out_dir / "metric_history.json"), "")
            cb.on_epoch_end(state, metrics)
            shown = {k: round(v, 4) for k, v in metrics.items() if k != "lr"}
            log.info("epoch %d/%d %s", epoch, cfg.train.epochs, shown)
        cb.on_train_end(state)
    except BaseException as e:
        cb.on_failure(state, e)
        raise
    return state
