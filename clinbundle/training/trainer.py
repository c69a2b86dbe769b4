"""The training loop, readable top to bottom.

    data -> validate -> resolve compute -> contract -> split -> model/loss/optim -> epochs
    (train, validate through the shared inference path, checkpoint) -> callbacks

Tracking is a callback (`clinbundle.training.tracking.MLflowCallback`); the loop only writes
files and announces them, so it runs the same with or without MLflow.

Preemption and resume. Every epoch draws its randomness (sampling order, patch crops, flips)
from seeds derived from (train.seed, epoch, rank), not from a stream that runs through the whole
training. So the batches of any epoch can be regenerated on any machine, and a run interrupted
after step k of an epoch resumes exactly: regenerate that epoch's batches, skip the first k,
continue with the restored model, optimizer, scheduler, GradScaler and RNG states. On SIGTERM the
current step finishes, `last` is written and announced (uploaded), and `Preempted` is raised.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset, DataLoader
from monai.utils import convert_to_tensor, set_determinism
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler
from tqdm import tqdm

from clinbundle.runtime.allocator import MALLOC_ENV, tune_allocator
from clinbundle.runtime.contract import Geometry, InferenceContract, Normalization
from clinbundle.runtime.errors import ConfigError, DataError, Preempted, ResumeError
from clinbundle.runtime.geometry import spacing_of
from clinbundle.runtime.inference import segment, torch_predictor
from clinbundle.runtime.labels import labels_from_probabilities
from clinbundle.runtime.networks import build_network, network_spec, spatial_divisor
from clinbundle.training import data as D
from clinbundle.training.callbacks import Callback, CallbackList, TrainState
from clinbundle.training.checkpoint import (
    atomic_save,
    atomic_write_bytes,
    restore_rng_states,
    rng_states,
)
from clinbundle.training.compute import Decision, resolve_compute
from clinbundle.training.config import Config
from clinbundle.training.distributed import DistInfo, barrier, dist_info, reduce_step
from clinbundle.training.losses import build_loss
from clinbundle.training.metrics import directions, is_better, segmentation_metrics

log = logging.getLogger("clinbundle.train")


def build_contract(
    cfg: Config,
    ds: D.Dataset,
    roi: tuple,
    geometry: Geometry | None = None,
    normalization: Normalization | None = None,
) -> InferenceContract:
    spec = network_spec(cfg.model.name, 1, ds.num_classes, cfg.model.filters)
    try:
        return InferenceContract(
            network=spec,
            in_channels=1,
            num_classes=ds.num_classes,
            labels=ds.labels,
            roi_size=roi,
            overlap=cfg.inference.overlap,
            blend_mode=cfg.inference.blend_mode,
            sw_batch_size=cfg.inference.sw_batch_size,
            spatial_divisor=spatial_divisor(spec),
            normalization=normalization or cfg.inference.normalization,
            modality=ds.modality,
            label_codes=ds.label_codes,
            geometry=geometry or Geometry(),
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
    pred_dir: Path,
) -> tuple[dict[str, float], list[Path]]:
    """Full-volume validation through the same sliding-window path every format uses.

    val_loss is the training loss of the blended softmax: it is fed log-probabilities, which
    softmax maps back to the same probabilities, so no second (logit) path is needed.

    Under DDP only rank 0 validates, on the whole validation set, while the other ranks wait.
    Why not shard the volumes: the metrics then come from one process and are bit-for-bit the
    single-GPU numbers (no gather order or padding of uneven shards to get right), and the
    prediction files it uploads are all on rank 0's disk. Validation is a small share of an
    epoch (a handful of full volumes vs. every training volume); shard it if that changes.
    """
    rows, files = [], []
    predictor = torch_predictor(model, amp=amp)
    for item in val_ds:
        # each case on its own grid, as a clinician would measure it: the inference path
        # resamples to the contract's grid and maps the probabilities back
        affine = item["image"].affine.numpy()
        image = item["image"].as_tensor().numpy()[None].astype(np.float32)
        label = item["label"].as_tensor().long()[None]
        probs = segment(predictor, image, contract, affine=affine, device=device)
        p = torch.from_numpy(probs)
        loss = float(loss_fn(torch.log(p.clamp_min(1e-8)), label))
        hard = labels_from_probabilities(probs[0], contract.postprocessing)
        case = item["case"]
        spacing = spacing_of(affine)
        m = segmentation_metrics(hard, label[0, 0].numpy(), contract.num_classes, spacing)
        rows.append({"val_loss": loss, **m})
        out = pred_dir / f"{case}.npz"
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(out, labels=hard, probabilities=probs[0].astype(np.float16))
        files.append(out)
    return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}, files


def epoch_seeds(seed: int, epoch: int, rank: int) -> tuple[int, int]:
    """Seeds of one epoch's loader generator and augmentations on one rank.

    A function of (seed, epoch, rank) only, so a resumed run regenerates exactly the batches the
    interrupted one would have drawn (SeedSequence mixes the three into independent streams).
    """
    a, b = np.random.SeedSequence([seed, epoch, rank]).generate_state(2)
    return int(a), int(b)


class StopOnSignal:
    """SIGTERM (what a spot/preemptible instance or a scheduler sends) sets a flag; the loop checks
    it after every step, so the step in progress always finishes and the state saved is coherent.

    Only the main thread can install handlers; elsewhere (a test harness thread) it is inert.
    """

    def __init__(self, signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)) -> None:
        self.signals = signals
        self.reason: str | None = None
        self._old: dict[signal.Signals, Any] = {}

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def _handle(self, signum: int, frame: object) -> None:
        if self.reason is None:
            self.reason = f"received {signal.Signals(signum).name}"
            log.warning(
                "%s: finishing the current step, then saving and uploading `last`", self.reason
            )

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in self.signals}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


class CheckpointPolicy:
    """When `last` is written: every `every_epochs` epochs, and mid-epoch once `every_minutes`
    have passed since the previous one (so a SIGKILL loses at most that much work)."""

    def __init__(self, every_epochs: int, every_minutes: float | None) -> None:
        self.every_epochs, self.every_minutes = every_epochs, every_minutes
        self.last_time = time.monotonic()

    def time_due(self) -> bool:
        return (
            self.every_minutes is not None
            and time.monotonic() - self.last_time >= self.every_minutes * 60
        )

    def epoch_due(self, epoch: int) -> bool:
        return epoch % self.every_epochs == 0 or self.time_due()

    def saved(self) -> None:
        self.last_time = time.monotonic()


def step_loss(
    net: torch.nn.Module, loss_fn: Callable[..., torch.Tensor], compiled: bool
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training step's loss of a batch. Compiled, network and loss are one graph (forward
    and backward): per step 8% faster on the default DynUNet than compiling the network
    alone, which leaves the loss's elementwise passes to eager kernels. Static shapes: every
    step has the same patch and batch size (a short last batch compiles once more); the
    weights stay the module's, so checkpoints are unchanged. `net` may be DDP-wrapped:
    Dynamo's DDP optimizer splits the graph at its gradient buckets."""

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return loss_fn(net(x), y)

    return torch.compile(loss_of, dynamic=False) if compiled else loss_of


def train(
    cfg: Config,
    out_dir: Path,
    callbacks: list[Callback] | None = None,
    resume: dict[str, Any] | None = None,
) -> TrainState:
    """Train `cfg`; with `resume` (a `last` checkpoint) continue exactly where it stopped.

    Under torchrun every rank calls this; only rank 0 writes files and runs `callbacks`.
    """
    cb = CallbackList(list(callbacks or []))
    info: DistInfo = dist_info()
    main = info.is_main

    # --- data, checked before anything expensive -------------------------------------------
    ds = D.validate_dataset(D.read_dataset(cfg.data.root))
    if resume is not None and resume.get("dataset_sha256") not in (None, ds.sha256):
        raise DataError(
            f"the data in {cfg.data.root} is not the data the run was trained on "
            f"(content hash {ds.sha256[:12]} != {resume['dataset_sha256'][:12]})",
            "Point --data at the run's data set to resume it.",
        )
    spec = network_spec(cfg.model.name, 1, ds.num_classes, cfg.model.filters)
    loss_fn = build_loss(cfg.loss)
    if cfg.train.selection_metric not in directions():
        raise ConfigError(
            f"train.selection_metric '{cfg.train.selection_metric}' is not one of "
            f"{list(directions())}"
        )
    divisor = spatial_divisor(spec)
    geo, geo_why, grid_shapes = D.resolve_geometry(ds, cfg.data)
    min_shape = tuple(int(x) for x in np.min(np.array(grid_shapes), axis=0))
    comp = resolve_compute(cfg.compute, min_shape, int(sum(map(np.prod, grid_shapes))), divisor)
    comp.decisions["target_spacing"] = Decision(
        list(geo.spacing) if geo.spacing else "native", cfg.data.target_spacing == "auto", geo_why
    )
    log.info("data.target_spacing = %s (%s)", comp.decisions["target_spacing"].value, geo_why)
    comp.decisions["allocator"] = Decision(
        tune_allocator(),
        MALLOC_ENV not in os.environ,
        "each step frees and allocates the same large buffers (runtime/allocator.py)",
    )
    if any(p % divisor for p in comp.patch_size):
        raise ConfigError(
            f"patch size {list(comp.patch_size)} must be a multiple of {divisor} for "
            f"{spec.family} with {len(cfg.model.filters)} levels"
        )
    D.check_patch_fits(ds, comp.patch_size, grid_shapes)
    if cfg.train.production:  # every labelled pair trains; nothing is held out to validate on
        split = {"train": list(ds.training), "val": []}
        log.info("production: training on all %d labelled pairs, no validation", len(ds.training))
    else:
        split = D.kfold_split(ds.training, cfg.data.folds, cfg.data.fold, cfg.train.seed)
    norm = cfg.inference.normalization
    if not norm.complete:
        norm = D.ct_normalization(ds, split["train"], cfg.train.seed)
        log.info("normalization ct from the training foreground: %s", norm.model_dump())
    roi = comp.patch_size if cfg.inference.roi_size == "auto" else cfg.inference.roi_size
    contract = build_contract(cfg, ds, tuple(roi), geo, norm)
    if resume is not None and resume.get("step") and resume.get("world_size", 1) != info.world_size:
        raise ResumeError(
            f"the run stopped mid-epoch with {resume.get('world_size', 1)} process(es); resume it "
            f"with the same number (now {info.world_size}) so the epoch's shards line up"
        )

    # --- deterministic set-up -----------------------------------------------------------------
    set_determinism(seed=cfg.train.seed)
    device, amp = comp.device, comp.amp
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
    to_grid = D.geometry_transforms(geo, *D.off_grid(ds, geo))
    train_tf = D.train_transforms(
        comp.patch_size, cfg.data.samples_per_volume, contract.normalization, to_grid
    )
    train_ds = CacheDataset(split["train"], train_tf, cache_rate=comp.cache_rate, progress=False)
    val_ds = CacheDataset(
        split["val"], D.val_transforms(), cache_rate=comp.cache_rate, progress=False
    )
    # DistributedSampler also for one process: the same per-epoch permutation (seed + epoch)
    # either way, and with N ranks each takes every N-th index of it.
    sampler = DistributedSampler(
        train_ds,
        num_replicas=info.world_size,
        rank=info.rank,
        shuffle=True,
        seed=cfg.train.seed,
    )
    generator = torch.Generator()
    loader = DataLoader(
        train_ds,
        batch_size=comp.batch_size,
        sampler=sampler,
        num_workers=cfg.data.num_workers,
        generator=generator,
    )

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
    start_epoch, skip_steps, resumed_losses = 1, 0, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        restore_rng_states(resume["rng"])
        state.history = list(resume.get("history", []))
        state.best = dict(resume.get("best", {}))
        state.best_epoch = dict(resume.get("best_epoch", {}))
        start_epoch = int(resume["epoch"]) + 1
        skip_steps = int(resume.get("step", 0))
        resumed_losses = list(resume.get("epoch_losses", []))
        state.extra["resumed_from"] = {"epoch": int(resume["epoch"]), "step": skip_steps}
        log.info(
            "resuming after epoch %d%s",
            resume["epoch"],
            f", {skip_steps} step(s) into epoch {start_epoch}" if skip_steps else "",
        )
    net: torch.nn.Module = model
    if info.enabled:
        net = DistributedDataParallel(
            model, device_ids=[info.local_rank] if device.type == "cuda" else None
        )
    forward_loss = step_loss(net, loss_fn, comp.compile)
    policy = CheckpointPolicy(cfg.train.checkpoint_every_epochs, cfg.train.checkpoint_every_minutes)

    def announce(path: Path, artifact_dir: str) -> None:
        cb.on_artifact(state, path, artifact_dir)

    def save_last(epochs_done: int, step: int, epoch_losses: list[float]) -> None:
        """`last` after `epochs_done` full epochs and `step` steps of the next one (rank 0)."""
        policy.saved()
        if not main:
            return
        last = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "rng": rng_states(),
            "epoch": epochs_done,
            "step": step,
            "epoch_losses": list(epoch_losses),
            "history": state.history,
            "best": state.best,
            "best_epoch": state.best_epoch,
            "world_size": info.world_size,
            "dataset_sha256": ds.sha256,
            "compute": {"batch_size": comp.batch_size, "patch_size": list(comp.patch_size)},
            "config": cfg.model_dump(mode="json"),
            "contract": contract.model_dump(mode="json"),
        }
        state.extra["last_checkpoint"] = {"epoch": epochs_done, "step": step}
        announce(atomic_save(last, ckpt_dir / "last.pt"), "checkpoints")
        log.info(
            "saved last: %s",
            f"epoch {epochs_done + 1} step {step}" if step else f"end of epoch {epochs_done}",
        )

    def preempted(epochs_done: int, step: int) -> Preempted:
        return Preempted(state.extra.get("run_id"), stopper.reason or "stop", epochs_done, step)

    stopper = StopOnSignal()
    try:
        with stopper:
            cb.on_train_begin(state)
            if main:
                split_file = atomic_write_bytes(
                    json.dumps(split, indent=2).encode(), out_dir / "split.json"
                )
                announce(split_file, "")
            for epoch in range(start_epoch, cfg.train.epochs + 1):
                state.epoch = epoch
                sampler.set_epoch(epoch)
                loader_seed, aug_seed = epoch_seeds(cfg.train.seed, epoch, info.rank)
                generator.manual_seed(loader_seed)
                train_ds.transform.set_random_state(seed=aug_seed)
                net.train()
                resumed = epoch == start_epoch
                losses = list(resumed_losses) if resumed else []
                skip = skip_steps if resumed else 0
                t0, steps = time.perf_counter(), len(loader)
                bar = tqdm(
                    loader,
                    desc=f"epoch {epoch}/{cfg.train.epochs}",
                    leave=False,
                    dynamic_ncols=True,
                    disable=not main,
                )
                for i, batch in enumerate(bar):
                    if i < skip:  # drawn again (same RNG use) but already trained on
                        continue
                    # plain tensors: torch.compile cannot trace MONAI's MetaTensor, and the
                    # loss needs no metadata
                    x, y = (
                        convert_to_tensor(batch[k], track_meta=False).to(device)
                        for k in ("image", "label")
                    )
                    optimizer.zero_grad(set_to_none=True)
                    with torch.autocast(device.type, enabled=amp):
                        loss = forward_loss(x, y)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    value, stop = reduce_step(loss.item(), stopper.requested, info, device)
                    losses.append(value)
                    bar.set_postfix(loss=f"{value:.4f}")
                    log.debug("epoch %d step %d/%d loss %.4f", epoch, i + 1, steps, value)
                    if stop or (i + 1 < steps and policy.time_due()):
                        save_last(epoch - 1, i + 1, losses)
                    if stop:
                        raise preempted(epoch - 1, i + 1)
                scheduler.step()
                metrics = {
                    "train_loss": float(np.mean(losses)),
                    "lr": scheduler.get_last_lr()[0],
                    "epoch_seconds": time.perf_counter() - t0,
                }

                validate = not cfg.train.production and (
                    epoch % cfg.train.val_every == 0 or epoch == cfg.train.epochs
                )
                if validate and main:
                    # rank 0 validates alone (see `validate_epoch`); the others wait below
                    val, pred_files = validate_epoch(
                        model,
                        val_ds,
                        contract,
                        loss_fn,
                        device,
                        amp,
                        out_dir / "val_predictions",
                    )
                    metrics |= val
                    for name in directions():
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
                _, stop = reduce_step(0.0, stopper.requested, info, device)
                if stop or epoch == cfg.train.epochs or policy.epoch_due(epoch):
                    save_last(epoch, 0, [])
                if main and cfg.train.production and epoch % cfg.train.checkpoint_every_epochs == 0:
                    # no validation picks a best epoch: keep the weights every N epochs instead
                    snapshot = {
                        "model": model.state_dict(),
                        "epoch": epoch,
                        "contract": contract.model_dump(mode="json"),
                    }
                    path = atomic_save(snapshot, ckpt_dir / f"epoch_{epoch:04d}.pt")
                    announce(path, "checkpoints")
                if main:
                    hist = json.dumps(
                        {"directions": directions(), "history": state.history}, indent=2
                    )
                    announce(atomic_write_bytes(hist.encode(), out_dir / "metric_history.json"), "")
                cb.on_epoch_end(state, metrics)
                shown = {k: round(v, 4) for k, v in metrics.items() if k != "lr"}
                log.info("epoch %d/%d %s", epoch, cfg.train.epochs, shown)
                if stop:
                    raise preempted(epoch, 0)
            barrier(info)
            cb.on_train_end(state)
    except BaseException as e:
        cb.on_failure(state, e)
        if isinstance(e, Preempted):
            # every rank stopped after the same step; none exits before rank 0 has uploaded
            # `last` and ended the run (torchrun stops the whole job when one rank exits)
            barrier(info)
        raise
    return state
