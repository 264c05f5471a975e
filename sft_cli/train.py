"""sft-train: fine-tune a pretrained classifier as configured in configs/ (start at configs/train.yaml).

The recipe reads top to bottom: seed/device -> data -> model -> freeze -> loss/optimizer/scheduler ->
resume -> epoch loop (train, validate, checkpoint) -> test of the best checkpoint -> summary.json.
train_one_epoch() and evaluate() follow it in this file; there are no hooks or callbacks.
"""

import json
import logging
import math
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau
from torch.utils.data import DataLoader

from sft_cli import checkpoint, config, console, data, freeze, loss, metrics, models, optim, runtime
from sft_cli.errors import SFTError

log = logging.getLogger("sft_cli.train")


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run the whole recipe; return the best value of trainer.monitor (what sweepers optimise)."""
    config.check(cfg)
    t = cfg.trainer
    if (run_dir / "summary.json").exists() or (run_dir / "checkpoints").exists():
        raise SFTError(f"{run_dir} already holds a run; it is left untouched. Choose another hydra.run.dir.")
    console.print_config(cfg)
    started = time.perf_counter()

    # Seed and device
    device = runtime.pick_device(t.device)
    runtime.seed_everything(cfg.seed, t.deterministic)
    if device.type == "cpu" and t.precision != "32":
        log.warning(f"trainer.precision={t.precision} on a CPU: most CPUs run it many times slower than 32")

    # Data. Its paths are made absolute, so checkpoints (which hold this config) work from any folder.
    for key in ("root", "train_file", "val_file", "test_file"):
        if cfg.dataset.get(key) is not None:
            cfg.dataset[key] = to_absolute_path(cfg.dataset[key])
    log.info(f"dataset <{cfg.dataset._target_}>")
    splits = config.build(cfg.dataset)
    classes = splits.classes
    train_loader = make_loader(splits.train, t.batch_size, t.num_workers, device, shuffle=True, collate=splits.collate,
                               group_lengths=splits.group_lengths)
    eval_batch = t.eval_batch_size or 2 * t.batch_size
    val_loader = make_loader(splits.val, eval_batch, t.num_workers, device, shuffle=False, collate=splits.collate)
    log.info(f"{len(classes)} classes; {len(splits.train)} train / {len(splits.val)} val / "
             f"{len(splits.test) if splits.test is not None else 0} test examples")

    # Model and freezing: the policy says which stages train in each epoch
    log.info(f"model <{cfg.model._target_}> {cfg.model.get('name', '')} (weights: {cfg.model.get('weights')})")
    model = config.build(cfg.model, classes=classes).to(device)
    head, stages = models.head_name(model), model.sft_stages
    policy = config.build(cfg.freeze)

    def frozen_at(epoch: int) -> list[str]:  # layers created from scratch (the new head, a new stem) always train
        return [s for s in policy.frozen(stages, head, epoch) if s not in model.sft_new_stages]

    frozen = frozen_at(0)
    freeze.apply(model, stages, frozen)
    counts = freeze.parameter_counts(model, stages)
    console.print_stages(counts)

    # Loss, optimizer and lr schedule
    criterion = loss.cross_entropy(cfg.loss, splits.train_targets, len(classes), device)
    extra_loss = config.build(cfg.loss.extra, model=model) if cfg.loss.extra else None
    optimizer = optim.build_optimizer(cfg.optimizer, model, head)
    steps_per_epoch = math.ceil(len(train_loader) / t.accumulate_grad_batches)
    total_steps = min(t.max_steps or math.inf, steps_per_epoch * t.max_epochs)
    scheduler = config.build(cfg.scheduler, optimizer, num_training_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "16-mixed")

    # Resume: weights, optimizer, schedule, RNG, counters and best metric from the checkpoint
    state = SimpleNamespace(epoch=0, step=0, best=None, best_epoch=None, bad_validations=0, elapsed=0.0)
    if cfg.resume:
        state = resume(cfg, run_dir, classes, model, optimizer, scheduler, scaler, total_steps)
    files = metrics.MetricsFiles(run_dir)

    # The epoch loop
    sign, patience = (1 if t.mode == "max" else -1), t.early_stopping_patience
    for epoch in range(state.epoch, t.max_epochs):
        if state.step >= total_steps or (patience and state.bad_validations >= patience):
            break  # max_steps reached or out of patience (also when resuming a run that had finished)
        if (now_frozen := frozen_at(epoch)) != frozen:
            log.info(f"epoch {epoch + 1}: unfreezing {sorted(set(frozen) - set(now_frozen))}")
            frozen = now_frozen
        freeze.apply(model, stages, frozen)
        train_stats = train_one_epoch(model, train_loader, criterion, extra_loss, optimizer, scheduler, scaler,
                                      device, t, len(classes), state, epoch, total_steps, files, started)
        state.epoch = epoch + 1
        finished = state.epoch == t.max_epochs or state.step >= total_steps
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
        save_checkpoint(run_dir, ["last", "best"] if improved else ["last"], model, optimizer, scheduler, scaler,
                        state, started, cfg, classes, row)
    files.close()
    stopped_early = bool(patience and state.bad_validations >= patience)
    if stopped_early:
        log.info(f"early stopping: {t.monitor} has not improved for {state.bad_validations} validations")

    # Test the best checkpoint on the held-out split
    best_dir = run_dir / "checkpoints" / "best"
    checkpoint.load_weights(best_dir, model)
    test = None
    if splits.test is not None:
        test_loader = make_loader(splits.test, eval_batch, t.num_workers, device, shuffle=False, collate=splits.collate)
        test = evaluate(model, test_loader, criterion, device, t.precision, len(classes))
        test = {k: test[k] for k in ("loss", "accuracy", "macro_f1")}
    summary = {"name": cfg.name, "status": "early_stopped" if stopped_early else "completed",
               "monitor": t.monitor, "mode": t.mode, "best_value": state.best, "best_epoch": state.best_epoch,
               "epochs": state.epoch, "steps": state.step, "test": test,
               "wall_time_s": round(state.elapsed + time.perf_counter() - started, 2), "device": str(device),
               "trainable_params": sum(r[1] for r in counts), "total_params": sum(r[2] for r in counts),
               "checkpoint": str(best_dir.absolute()), "run_dir": str(run_dir.absolute())}
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print_key_values("summary", {k: v for k, v in summary.items() if k not in ("test", "run_dir")}
                             | {f"test {k}": v for k, v in (test or {}).items()})
    log.info(f"best checkpoint: {best_dir}   evaluate it with: sft-eval checkpoint={best_dir}")
    return float(state.best)


def make_loader(dataset, batch_size: int, num_workers: int, device: torch.device, shuffle: bool,
                collate=None, group_lengths: list[int] | None = None) -> DataLoader:
    # A last train batch of one sample would make BatchNorm fail, so it is dropped in that case only.
    # Workers are not persistent: fresh ones draw their seeds from the torch RNG each epoch, which the
    # checkpoint holds, so a resumed run sees the same augmentations as an uninterrupted one.
    common = {"num_workers": num_workers, "collate_fn": collate, "pin_memory": device.type == "cuda"}
    if group_lengths is not None:
        return DataLoader(dataset, batch_sampler=data.LengthGroupedBatches(group_lengths, batch_size), **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                      drop_last=shuffle and len(dataset) % batch_size == 1, **common)


def train_one_epoch(model, loader, criterion, extra_loss, optimizer, scheduler, scaler, device, t, num_classes,
                    state, epoch, total_steps, files, started) -> dict:
    """One pass over `loader`. Loss and confusion counts accumulate on the device and are read only every
    trainer.log_every_n_steps optimizer steps, so the GPU never waits for the host in between."""
    accumulate, per_step_schedule = t.accumulate_grad_batches, not isinstance(scheduler, ReduceLROnPlateau)
    trainable = [p for p in model.parameters() if p.requires_grad]
    window = _Window(num_classes, device)
    epoch_totals = _Window(num_classes, device)
    epoch_start = time.perf_counter()
    with console.progress_bar(t.progress_bar) as bar:
        task = bar.add_task(f"epoch {epoch + 1}", total=len(loader), info="") if bar else None
        for i, (inputs, targets) in enumerate(loader):
            inputs, targets = to_device(inputs, device), targets.to(device, non_blocking=True)
            with runtime.autocast(device, t.precision):
                logits = model(inputs)
                task_loss = criterion(logits, targets)
                total_loss = task_loss + extra_loss(model) if extra_loss else task_loss
            group = min(accumulate, len(loader) - i // accumulate * accumulate)  # the last group may be short
            scaler.scale(total_loss / group).backward()
            for w in (window, epoch_totals):
                w.add(task_loss.detach(), _weight(criterion, targets), logits.detach(), targets)
            if (i + 1) % accumulate and i + 1 != len(loader):
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
                files.record(record)
                if bar:
                    bar.update(task, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                          f"{record['samples_per_s']:.0f} samples/s")
                window = _Window(num_classes, device)
            if state.step >= total_steps:
                break
    stats = epoch_totals.read()
    stats["samples_per_s"] = epoch_totals.samples / (time.perf_counter() - epoch_start)
    return stats


class _Window:
    """Running loss and confusion counts on the device; read() syncs once and returns plain numbers."""

    def __init__(self, num_classes: int, device: torch.device):
        self.loss_sum = torch.zeros((), device=device)
        self.weight_sum = torch.zeros((), device=device)
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.long, device=device)
        self.samples, self.num_classes, self.start = 0, num_classes, time.perf_counter()

    def add(self, mean_loss: torch.Tensor, weight: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.loss_sum += mean_loss.float() * weight
        self.weight_sum += weight
        self.confusion += metrics.confusion(logits, targets, self.num_classes)
        self.samples += len(targets)

    def read(self) -> dict:
        s = metrics.scores(self.confusion)
        return {"loss": (self.loss_sum / self.weight_sum.clamp(min=1e-12)).item(), "accuracy": s["accuracy"],
                "macro_f1": s["macro_f1"], "samples_per_s": self.samples / (time.perf_counter() - self.start)}


def evaluate(model: nn.Module, loader: DataLoader, criterion, device: torch.device, precision: str,
             num_classes: int) -> dict:
    """Loss, accuracy, macro-F1, per-class scores and the confusion matrix of `model` over `loader`."""
    model.eval()
    start = time.perf_counter()
    window = _Window(num_classes, device)
    with torch.inference_mode(), runtime.autocast(device, precision):
        for inputs, targets in loader:
            inputs, targets = to_device(inputs, device), targets.to(device, non_blocking=True)
            logits = model(inputs)
            window.add(criterion(logits.float(), targets), _weight(criterion, targets), logits, targets)
    result = {**window.read(), **metrics.scores(window.confusion), "confusion": window.confusion.tolist()}
    result["samples_per_s"] = window.samples / (time.perf_counter() - start)
    return result


def base_lr(optimizer) -> float:
    """The scheduled optimizer.lr, whatever head_lr or layer_decay do to each group (what gets logged)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def to_device(inputs, device: torch.device):
    """A batch's inputs on the device: an image tensor, or the dict of token tensors of a text batch."""
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def _weight(criterion: nn.CrossEntropyLoss, targets: torch.Tensor) -> torch.Tensor:
    """What the batch's mean loss was divided by: its size, or with class weights the sum of its weights."""
    if criterion.weight is None:
        return torch.tensor(float(len(targets)), device=targets.device)
    return criterion.weight[targets].sum()


def save_checkpoint(run_dir, tags, model, optimizer, scheduler, scaler, state, started, cfg, classes, row) -> None:
    elapsed = state.elapsed + time.perf_counter() - started
    blob = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
            "rng": runtime.rng_state(), "epoch": state.epoch, "step": state.step, "best": state.best,
            "best_epoch": state.best_epoch, "bad_validations": state.bad_validations, "elapsed": elapsed}
    meta = {"classes": classes, "epoch": state.epoch, "step": state.step, "metrics": row,
            "monitor": cfg.trainer.monitor, "best": state.best}
    checkpoint.save(run_dir / "checkpoints", tags, model, blob, cfg, meta)


def resume(cfg: DictConfig, run_dir: Path, classes, model, optimizer, scheduler, scaler,
           total_steps: int) -> SimpleNamespace:
    """Load a checkpoint's training state: weights, optimizer state (its lr, momentum and weight decay
    included), schedule position, grad scaler, RNG, counters and best metric. Everything else (epochs,
    schedule length, data, logging) follows the current config; the differences are listed in the log.
    The source run's checkpoints and metric history are copied into the new run folder, never moved."""
    ckpt = checkpoint.resolve(cfg.resume)
    meta = checkpoint.load_meta(ckpt)
    if meta["classes"] != classes:
        raise SFTError(f"resume={cfg.resume}: the checkpoint was trained on classes {meta['classes']}, "
                       f"but the configured dataset has {classes}. Resume with the same dataset.")
    for line in config.differences(checkpoint.load_config(ckpt), cfg, ignore=("resume",)):
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
    checkpoint.copy_history(ckpt, run_dir, blob["epoch"], blob["step"])
    log.info(f"resumed from {ckpt.resolve()} at epoch {blob['epoch']}, step {blob['step']} "
             f"(best {blob['best']} at epoch {blob['best_epoch']})")
    return SimpleNamespace(**{k: blob[k] for k in ("epoch", "step", "best", "best_epoch", "bad_validations",
                                                   "elapsed")})


if __name__ == "__main__":  # python -m sft_cli.train ... (as torchrun launches it) is sft-train
    from sft_cli.cli import train_main

    train_main()
