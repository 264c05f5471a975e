"""sft-train: fine-tune a pretrained classifier as configured in configs/ (start at configs/train.yaml).

The recipe reads top to bottom: seed/device -> data -> model -> freeze -> loss/optimizer/scheduler ->
resume -> epoch loop (train, validate, checkpoint) -> test of the best checkpoint -> summary.json.
train_one_epoch() and evaluate() follow it in this file; there are no hooks or callbacks.
Under torchrun every process runs this recipe on its shard of the data (see distributed.py); `ctx.is_main`
marks what only rank 0 does: write files and print.
"""

import contextlib
import json
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau
from torch.utils.data import DataLoader

from sft_cli import checkpoint, config, console, data, distributed, freeze, loss, metrics, models, optim, runtime
from sft_cli.errors import SFTError

log = logging.getLogger("sft_cli.train")


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run the whole recipe; return the best value of trainer.monitor (what sweepers optimise)."""
    config.check(cfg)
    t = cfg.trainer
    if t.devices > 1 and not distributed.under_torchrun():  # sft-train trainer.devices=N: start N processes
        return distributed.launch(list(HydraConfig.get().overrides.task), run_dir, t.devices, t.device)
    ctx, device = distributed.init(t.device)
    run_dir = Path(distributed.broadcast_object(str(run_dir), ctx))  # the folder rank 0's Hydra made
    if ctx.is_main and ((run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists()):
        raise SFTError(f"{run_dir} already holds a run; it is left untouched. Choose another hydra.run.dir.")
    if ctx.enabled and t.devices not in (1, ctx.world_size):
        raise SFTError(f"trainer.devices={t.devices} but torchrun started {ctx.world_size} processes: "
                       "leave trainer.devices at 1 under torchrun (its --nproc_per_node decides).")
    if t.sync_batchnorm and ctx.enabled and device.type != "cuda":
        raise SFTError("trainer.sync_batchnorm=true needs CUDA (torch's SyncBatchNorm runs on GPUs only): set "
                       "trainer.sync_batchnorm=false on CPU.")
    if t.batch_size % ctx.world_size:
        raise SFTError(f"trainer.batch_size={t.batch_size} is the global batch and must divide evenly over "
                       f"{ctx.world_size} processes: use a multiple of {ctx.world_size}.")
    if ctx.is_main:
        console.print_config(cfg)
    started = time.perf_counter()

    # Seed and device (the model's initial weights are rank 0's: DDP broadcasts them when it wraps the model)
    runtime.seed_everything(cfg.seed, t.deterministic)
    if device.type == "cpu" and t.precision not in ("32", "auto"):
        log.warning(f"trainer.precision={t.precision} on a CPU: most CPUs run it many times slower than 32")

    # Data. Its paths are made absolute, so checkpoints (which hold this config) work from any folder.
    for key in ("root", "train_file", "val_file", "test_file"):
        if cfg.dataset.get(key) is not None:
            cfg.dataset[key] = to_absolute_path(cfg.dataset[key])
    log.info(f"dataset <{cfg.dataset._target_}>")
    splits = config.build(cfg.dataset)
    classes = splits.classes
    batch = t.batch_size // ctx.world_size  # per process; the global batch is what the config says
    train_loader = data.make_loader(splits.train, batch, t.num_workers, device, shuffle=True, collate=splits.collate,
                               group_lengths=splits.group_lengths, ctx=ctx, seed=cfg.seed,
                               persistent_workers=t.persistent_workers)
    eval_batch = t.eval_batch_size or 2 * batch
    val_loader = data.make_loader(splits.val, eval_batch, t.num_workers, device, shuffle=False, collate=splits.collate,
                             ctx=ctx, persistent_workers=t.persistent_workers)
    log.info(f"{len(classes)} classes; {len(splits.train)} train / {len(splits.val)} val / "
             f"{len(splits.test) if splits.test is not None else 0} test examples")

    # Model and freezing: the policy says which stages train in each epoch
    log.info(f"model <{cfg.model._target_}> {cfg.model.get('name', '')} (weights: {cfg.model.get('weights')})")
    model = config.build(cfg.model, classes=classes)
    if ctx.enabled and t.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if t.channels_last or (t.channels_last is None and device.type == "cuda" and not isinstance(model, models.TextClassifier)):
        model = model.to(memory_format=torch.channels_last)
    head, stages = models.head_name(model), model.sft_stages
    policy = config.build(cfg.freeze)

    def frozen_at(epoch: int) -> list[str]:  # layers created from scratch (the new head, a new stem) always train
        return [s for s in policy.frozen(stages, head, epoch) if s not in model.sft_new_stages]

    frozen = frozen_at(0)
    freeze.apply(model, stages, frozen)
    counts = freeze.parameter_counts(model, stages)
    if ctx.is_main:
        console.print_stages(counts)
    if t.compile:
        model.compile()  # in place: training (through DDP too) and evaluation call the compiled forward
    trained = distributed.wrap(model, device, ctx)  # what the forward pass calls: model, or its DDP wrapper

    # Loss, optimizer and lr schedule
    criterion = loss.cross_entropy(cfg.loss, splits.train_targets, len(classes), device)
    extra_loss = config.build(cfg.loss.extra, model=model) if cfg.loss.extra else None
    optimizer = optim.build_optimizer(cfg.optimizer, model, head)
    steps_per_epoch = math.ceil(len(train_loader) / t.accumulate_grad_batches)
    total_steps = min(t.max_steps or math.inf, steps_per_epoch * t.max_epochs)  # what the schedule plans for
    step_limit = t.max_steps or math.inf  # epochs bound the run otherwise (a resumed run may step differently)
    scheduler = config.build(cfg.scheduler, optimizer, num_training_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "16-mixed")

    # Resume: weights, optimizer, schedule, RNG, counters and best metric from the checkpoint
    state = SimpleNamespace(epoch=0, step=0, best=None, best_epoch=None, bad_validations=0, elapsed=0.0)
    if cfg.resume:
        state = resume(cfg, run_dir, classes, model, optimizer, scheduler, scaler, total_steps, ctx)
    files = metrics.MetricsFiles(run_dir, enabled=ctx.is_main)

    # The epoch loop
    sign, patience = (1 if t.mode == "max" else -1), t.early_stopping_patience
    for epoch in range(state.epoch, t.max_epochs):
        if state.step >= step_limit or (patience and state.bad_validations >= patience):
            break  # max_steps reached or out of patience (also when resuming a run that had finished)
        unfreezing = (now_frozen := frozen_at(epoch)) != frozen
        if unfreezing:
            log.info(f"epoch {epoch + 1}: unfreezing {sorted(set(frozen) - set(now_frozen))}")
            frozen = now_frozen
        freeze.apply(model, stages, frozen)
        if unfreezing:
            trained = distributed.wrap(model, device, ctx)  # DDP must see the new trainable parameters
        if ctx.enabled:  # each rank its own augmentations, reproducible per (seed, epoch, rank) when resumed
            torch.manual_seed(cfg.seed + 1_000_003 * epoch + ctx.rank)
        data.set_epoch(train_loader, epoch)
        train_stats = train_one_epoch(trained, train_loader, criterion, extra_loss, optimizer, scheduler, scaler,
                                      device, t, len(classes), state, epoch, step_limit, files, started, ctx)
        state.epoch = epoch + 1
        finished = state.epoch == t.max_epochs or state.step >= step_limit
        row = {"epoch": state.epoch, "step": state.step, "lr": base_lr(optimizer),
               **{f"train_{k}": v for k, v in train_stats.items()}}
        improved = False
        if state.epoch % t.val_every_n_epochs == 0 or finished:
            val = evaluate(model, val_loader, criterion, device, t.precision, len(classes))
            value = val[t.monitor.split("/")[1]]
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(value)
            improved = state.best is None or sign * (value - state.best) > 0
            if improved:
                state.best, state.best_epoch, state.bad_validations = value, state.epoch, 0
            else:
                state.bad_validations += 1
            files.record({"epoch": state.epoch, "step": state.step, "split": "val",
                          **{k: val[k] for k in ("loss", "accuracy", "macro_f1", "samples_per_s")},
                          "lr": row["lr"], "elapsed": state.elapsed + time.perf_counter() - started})
            row.update({f"val_{k}": val[k] for k in ("loss", "accuracy", "macro_f1")})
            log.info(f"epoch {state.epoch}/{t.max_epochs}  train loss {train_stats['loss']:.4f} "
                     f"acc {train_stats['accuracy']:.4f} | val loss {val['loss']:.4f} acc {val['accuracy']:.4f} "
                     f"f1 {val['macro_f1']:.4f} | {train_stats['samples_per_s']:.0f} samples/s"
                     f"{'  (best)' if improved else ''}")
        row["elapsed"] = state.elapsed + time.perf_counter() - started
        files.epoch_row(row)
        if ctx.is_main:
            save_checkpoint(run_dir, ["last", "best"] if improved else ["last"], model, optimizer, scheduler,
                            scaler, state, started, cfg, classes, row)
    files.close()
    stopped_early = bool(patience and state.bad_validations >= patience)
    if stopped_early:
        log.info(f"early stopping: {t.monitor} has not improved for {state.bad_validations} validations")

    # Test the best checkpoint on the held-out split
    best_dir = run_dir / "checkpoints" / "best"
    if ctx.is_main:
        checkpoint.load_weights(best_dir, model)
    distributed.broadcast_module(model, ctx)
    test = None
    if splits.test is not None:
        test_loader = data.make_loader(splits.test, eval_batch, t.num_workers, device, shuffle=False,
                                  collate=splits.collate, ctx=ctx)
        test = evaluate(model, test_loader, criterion, device, t.precision, len(classes))
        test = {k: test[k] for k in ("loss", "accuracy", "macro_f1", "samples")}
    summary = {"name": cfg.name, "status": "early_stopped" if stopped_early else "completed",
               "monitor": t.monitor, "mode": t.mode, "best_value": state.best, "best_epoch": state.best_epoch,
               "epochs": state.epoch, "steps": state.step, "test": test,
               "wall_time_s": round(state.elapsed + time.perf_counter() - started, 2), "device": str(device),
               "processes": ctx.world_size,
               "trainable_params": sum(r[1] for r in counts), "total_params": sum(r[2] for r in counts),
               "checkpoint": str(best_dir.absolute()), "run_dir": str(run_dir.absolute())}
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        console.print_key_values("summary", {k: v for k, v in summary.items() if k not in ("test", "run_dir")}
                                 | {f"test {k}": v for k, v in (test or {}).items()})
        log.info(f"best checkpoint: {best_dir}   evaluate it with: sft-eval checkpoint={best_dir}")
    distributed.close()
    return float(state.best)


def train_one_epoch(model, loader, criterion, extra_loss, optimizer, scheduler, scaler, device, t, num_classes,
                    state, epoch, step_limit, files, started, ctx=distributed.Context()) -> dict:
    """One pass over `loader`. Loss and confusion counts accumulate on the device and are read only every
    trainer.log_every_n_steps optimizer steps, so the GPU never waits for the host in between.
    `model` may be a DDP wrapper: it averages gradients over processes on the backward pass of the last
    micro-batch of each optimizer step (no_sync() skips that on the others)."""
    accumulate, per_step_schedule = t.accumulate_grad_batches, not isinstance(scheduler, ReduceLROnPlateau)
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = _Window(num_classes, device)
    epoch_totals = _Window(num_classes, device)
    epoch_start = time.perf_counter()
    with console.progress_bar(t.progress_bar and ctx.is_main) as bar:
        task = bar.add_task(f"epoch {epoch + 1}", total=len(loader), info="") if bar else None
        for i, (inputs, targets) in enumerate(loader):
            inputs, targets = data.to_device(inputs, device), targets.to(device, non_blocking=True)
            stepping = (i + 1) % accumulate == 0 or i + 1 == len(loader)
            with contextlib.nullcontext() if stepping or not ctx.enabled else model.no_sync():
                with runtime.autocast(device, t.precision):
                    logits = model(inputs)
                    task_loss = criterion(logits, targets)
                    total_loss = task_loss + extra_loss(model) if extra_loss else task_loss
                group = min(accumulate, len(loader) - i // accumulate * accumulate)  # the last group may be short
                scaler.scale(total_loss / group).backward()
            for w in (window, epoch_totals):
                w.add(task_loss.detach(), _weight(criterion, targets), logits.detach(), targets)
            if not stepping:
                continue  # accumulate more gradient before stepping
            if t.gradient_clip_norm:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(trainable, t.gradient_clip_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if per_step_schedule:
                scheduler.step()
            state.step += 1
            if bar:
                bar.advance(task, group)
            if state.step % t.log_every_n_steps == 0:
                record = {"epoch": epoch + 1, "step": state.step, "split": "train", **window.read(),
                          "lr": base_lr(optimizer), "elapsed": state.elapsed + time.perf_counter() - started}
                _check_finite(record["loss"], state.step, optimizer)
                files.record(record)
                if bar:
                    bar.update(task, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                          f"{record['samples_per_s']:.0f} samples/s")
                window = _Window(num_classes, device)
            if state.step >= step_limit:
                break
    stats = epoch_totals.read()
    stats["samples_per_s"] = stats["samples"] / (time.perf_counter() - epoch_start)
    _check_finite(stats["loss"], state.step, optimizer)
    return stats


def _check_finite(value: float, step: int, optimizer) -> None:
    if not math.isfinite(value):
        raise SFTError(f"the training loss became {value} by step {step} (lr {base_lr(optimizer):.2e}): the run "
                       "diverged. Lower optimizer.lr, or set trainer.gradient_clip_norm (e.g. 1.0).")


class _Window:
    """Running loss and confusion counts on the device; read() syncs once, sums over DDP processes, keeps
    the summed confusion matrix in `.total` and its scores in `.scores`, and returns plain numbers."""

    def __init__(self, num_classes: int, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.weight_sum = 0.0  # a host float, or a device tensor once class weights are added
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        self.num_classes, self.device, self.start = num_classes, device, time.perf_counter()

    def add(self, mean_loss: torch.Tensor, weight, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += mean_loss.float() * weight
        self.weight_sum += weight
        metrics.confusion(logits, targets, self.num_classes, out=self.confusion)

    def read(self) -> dict:
        weight_sum = torch.as_tensor(self.weight_sum, dtype=torch.float32, device=self.device)
        loss_sum, weight_sum, self.total = distributed.all_reduce_sum(self.loss_sum, weight_sum, self.confusion)
        self.scores = s = metrics.scores(self.total)
        samples = int(self.total.sum())
        return {"loss": (loss_sum / weight_sum.clamp(min=1e-12)).item(), "accuracy": s["accuracy"],
                "macro_f1": s["macro_f1"], "samples": samples,
                "samples_per_s": samples / (time.perf_counter() - self.start)}


def evaluate(model: nn.Module, loader: DataLoader, criterion, device: torch.device, precision: str,
             num_classes: int) -> dict:
    """Loss, accuracy, macro-F1, per-class scores and the confusion matrix of `model` over `loader`."""
    model.eval()
    start = time.perf_counter()
    window = _Window(num_classes, device)
    with torch.inference_mode(), runtime.autocast(device, precision):
        for inputs, targets in loader:
            inputs, targets = data.to_device(inputs, device), targets.to(device, non_blocking=True)
            logits = model(inputs)
            window.add(criterion(logits.float(), targets), _weight(criterion, targets), logits, targets)
    result = window.read()
    result |= {**window.scores, "confusion": window.total.tolist(),
               "samples_per_s": result["samples"] / (time.perf_counter() - start)}
    return result


def base_lr(optimizer) -> float:
    """The scheduled optimizer.lr, whatever head_lr or layer_decay do to each group (what gets logged)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def _weight(criterion: nn.CrossEntropyLoss, targets: torch.Tensor) -> float | torch.Tensor:
    """What the batch's mean loss was divided by: its size (known on the host, so no copy to the GPU), or
    with class weights the sum of its weights (a device tensor)."""
    if criterion.weight is None:
        return float(len(targets))
    return criterion.weight[targets].sum()


def save_checkpoint(run_dir, tags, model, optimizer, scheduler, scaler, state, started, cfg, classes, row) -> None:
    elapsed = state.elapsed + time.perf_counter() - started
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": runtime.rng_state(), "epoch": state.epoch, "step": state.step, "best": state.best,
            "best_epoch": state.best_epoch, "bad_validations": state.bad_validations, "elapsed": elapsed}
    meta = {"classes": classes, "epoch": state.epoch, "step": state.step, "metrics": row,
            "monitor": cfg.trainer.monitor, "best": state.best}
    checkpoint.save(run_dir / "checkpoints", tags, model, blob, cfg, meta)


def resume(cfg: DictConfig, run_dir: Path, classes, model, optimizer, scheduler, scaler, total_steps: int,
           ctx=distributed.Context()) -> SimpleNamespace:
    """Load a checkpoint's training state: weights, optimizer state (its lr, momentum and weight decay
    included), schedule position, grad scaler, RNG, counters and best metric. Everything else (epochs,
    schedule length, data, logging) follows the current config; the differences are listed in the log.
    The source run's checkpoints and metric history are copied into the new run folder, never moved.
    Under DDP every process reads the checkpoint (so it must be on storage they all see); the process count
    may differ from the source run's, since checkpoints hold the unwrapped model and are saved at epoch ends."""
    ckpt = checkpoint.resolve(cfg.resume)
    meta = checkpoint.load_meta(ckpt)
    if meta["classes"] != classes:
        raise SFTError(f"resume={cfg.resume}: the checkpoint was trained on classes {meta['classes']}, "
                       f"but the configured dataset has {classes}. Resume with the same dataset.")
    for line in config.differences(checkpoint.load_config(ckpt), cfg, ignore=("resume", "sweep")):
        log.warning(f"resume: {line} (the current value is used)")
    checkpoint.load_weights(ckpt, model)
    blob = checkpoint.load_state(ckpt)
    if isinstance(scheduler, OneCycleLR) and blob["scheduler"].get("total_steps") != total_steps:
        planned = blob["scheduler"].get("total_steps")
        raise SFTError(f"resume={cfg.resume}: scheduler=onecycle was planned for {planned} "
                       f"steps and cannot be stretched to {total_steps}: keep trainer.max_epochs/max_steps as they "
                       "were, or use a scheduler such as cosine, whose length follows the current config.")
    try:
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    except (ValueError, KeyError) as e:
        raise SFTError(f"resume={cfg.resume}: its optimizer/scheduler state does not fit the configured "
                       f"optimizer={type(optimizer).__name__}, scheduler={type(scheduler).__name__} ({e}). "
                       "Resume with the optimizer and scheduler the run was started with.") from e
    if scaler.is_enabled() and blob["scaler"]:  # empty when the run was saved without 16-mixed
        scaler.load_state_dict(blob["scaler"])
    runtime.set_rng_state(blob["rng"])
    if ctx.is_main:
        checkpoint.copy_history(ckpt, run_dir, blob["epoch"], blob["step"])
    log.info(f"resumed from {ckpt.resolve()} at epoch {blob['epoch']}, step {blob['step']} "
             f"(best {blob['best']} at epoch {blob['best_epoch']})")
    return SimpleNamespace(**{k: blob[k] for k in ("epoch", "step", "best", "best_epoch", "bad_validations",
                                                   "elapsed")})


if __name__ == "__main__":  # python -m sft_cli.train ... (as torchrun launches it) is sft-train
    from sft_cli.cli import train_main

    train_main()
