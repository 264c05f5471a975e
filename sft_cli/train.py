"""sft-train's recipe and its one training loop, for every task (configs/task/: classification, ...).

The recipe, train(), reads top to bottom: checks -> seed/device -> data -> model -> freeze -> loss, optimizer,
schedule -> resume -> epoch loop (train, validate, checkpoint) -> test of the best checkpoint -> summary.json.
The loop below it (train_one_epoch, validate, evaluate, save_checkpoint, resume) exists once: accumulation,
clipping, the grad scaler, schedule steps, metric windows read at log intervals, checkpoints within and at
the end of epochs, bitwise resume, DDP and FSDP. What differs between tasks (data, model, the loss of a batch, what
is accumulated and reported) is asked of the task object (task.py says what it provides); there are no hooks.
Under torchrun every process runs this recipe on its shard of the data (distributed.py); `ctx.is_main` marks
what only rank 0 does: write files and print.
"""

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.optim.lr_scheduler import OneCycleLR, ReduceLROnPlateau

from sft_cli import checks, config
from sft_cli.errors import SFTError
from sft_cli.models import adapters, freeze, parts, stages
from sft_cli.results import console, loggers
from sft_cli.results.metrics_files import MetricsFiles
from sft_cli.task import Splits, Task
from sft_cli.training import checkpoint, distributed, loading, optim, runtime, shards

log = logging.getLogger("sft_cli.train")


@dataclass
class TrainState:
    """Where a run stands. Every checkpoint's state.pt holds these fields under their own names, and resume
    restores them from there (to_checkpoint / from_checkpoint: the one place that lists them)."""

    epoch: int = 0                 # epochs completed
    step: int = 0                  # optimizer steps taken
    batch: int = 0                 # batches of the current epoch trained (> 0: a checkpoint within an epoch)
    best: float | None = None      # best value of trainer.monitor so far ...
    best_epoch: int | None = None  # ... and the epoch that reached it
    bad_validations: int = 0       # validations in a row without improvement (early stopping)
    elapsed: float = 0.0           # seconds of training, over every resume
    best_result: dict | None = None  # the best validation's whole result: a test split that is the val split reuses it

    def to_checkpoint(self) -> dict:
        return asdict(self)

    @classmethod
    def from_checkpoint(cls, blob: dict) -> "TrainState":
        return cls(**{f.name: blob.get(f.name, f.default) for f in fields(cls)})


@dataclass
class Run:
    """What every part of the loop reads and nothing in it changes (but `within_epoch`, used once)."""

    cfg: DictConfig
    run_dir: Path
    task: Task
    device: torch.device
    ctx: distributed.Context
    started: float = 0.0                   # time.perf_counter() at the start, less the elapsed time resumed
    files: MetricsFiles | None = None
    within_epoch: dict | None = None       # a checkpoint written within an epoch: where its batches resume


@dataclass
class Learner:
    """What the loop updates."""

    model: nn.Module
    trained: nn.Module                     # what the forward pass calls: the model (FSDP: sharded), or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    frozen: list[str]                      # the stages frozen in the current epoch


def train(cfg: DictConfig, run_dir: Path) -> float:
    """Run the whole recipe; return the best value of trainer.monitor (what sweepers optimise)."""
    checks.check(cfg)
    t = cfg.trainer
    if t.devices > 1 and not distributed.under_torchrun():  # sft-train trainer.devices=N: start N processes
        return distributed.launch(list(HydraConfig.get().overrides.task), run_dir, t.devices, t.device,
                                  t.strategy)
    ctx, device = distributed.init(t.device, t.strategy)
    run_dir = Path(distributed.broadcast_object(str(run_dir), ctx))  # the folder rank 0's Hydra made
    _check_processes(cfg, run_dir, ctx, device)
    task = config.build(cfg.task)
    checks.check_monitor(cfg, task.metrics, getattr(task, "metrics_off", None))
    run = Run(cfg, run_dir, task, device, ctx, started=time.perf_counter())
    if ctx.is_main:
        if cfg.get("verbose"):
            console.print_config(cfg)
        else:
            log.info(f"config: {run_dir / '.hydra' / 'config.yaml'} (verbose=true prints it here)")
        checkpoint.clear_stale(run_dir / "checkpoints")  # left by a killed run in this folder

    # Seed and device (the model's initial weights are rank 0's: DDP broadcasts them when it wraps the model)
    runtime.seed_everything(cfg.seed, t.deterministic)
    if device.type == "cpu" and t.precision not in ("32", "auto"):
        log.warning(f"trainer.precision={t.precision} on a CPU: most CPUs run it many times slower than 32")

    # Data. Its paths are made absolute, so checkpoints (which hold this config) work from any folder.
    for key in ("root", "train_file", "val_file", "test_file"):
        if cfg.dataset.get(key) is not None:
            cfg.dataset[key] = to_absolute_path(cfg.dataset[key])
    if OmegaConf.is_list(cfg.dataset.get("train_files")):  # dataset.train_files=[a.jsonl,b.jsonl]
        cfg.dataset.train_files = [to_absolute_path(file) for file in cfg.dataset.train_files]
    if cfg.dataset.get("hub") and Path(to_absolute_path(cfg.dataset.hub)).exists():  # a folder, not a hub name
        cfg.dataset.hub = to_absolute_path(cfg.dataset.hub)
    log.info(f"task <{cfg.task._target_}>, dataset <{cfg.dataset._target_}>")
    splits = task.data(cfg.dataset)
    options = loading.LoaderOptions(device, t.num_workers, t.persistent_workers, cfg.seed, ctx)
    batch = t.batch_size // ctx.world_size  # per process; the global batch is what the config says
    eval_batch = t.eval_batch_size or 2 * batch
    train_loader = loading.make_loader(splits, "train", batch, options)
    val_loader = loading.make_loader(splits, "val", eval_batch, options)
    log.info(f"{len(splits.train)} train / {len(splits.val)} val / "
             f"{len(splits.test) if splits.test is not None else 0} test examples")

    # Model and freezing: the policy says which stages train in each epoch
    log.info(f"model <{cfg.model._target_}> {cfg.model.get('name', cfg.model.get('name_or_path', ''))} "
             f"(weights: {cfg.model.get('weights')})")
    model = parts.require(task.model(cfg.model), cfg.model._target_)
    lora = config.build(cfg.adapter) if cfg.get("adapter") else None
    model = _place(adapters.apply(model, lora), t, device, ctx)  # adapter=lora: peft
    policy = config.build(cfg.freeze)
    frozen = _frozen_stages(policy, model, 0)
    freeze.apply(model, model.sft.stages, frozen)
    _check_something_trains(model, 0, cfg)
    counts = freeze.parameter_counts(model, model.sft.stages)
    if ctx.is_main:
        console.report_stages(counts, run_dir / "parameters.txt", on_screen=cfg.get("verbose", False))
    if t.compile:
        model.compile()  # in place: training (through DDP too) and evaluation call the compiled forward

    # Loss, optimizer and lr schedule (FSDP shards the model in place first: the optimizer holds the shards)
    task.set_loss(cfg.loss, splits, model)
    trained = distributed.wrap(model, device, ctx, t.precision, t.cpu_offload)
    optimizer = optim.build_optimizer(cfg.optimizer, cfg.param_groups, model, stages.head_name(model))
    steps_per_epoch = math.ceil(len(train_loader) / t.accumulate_grad_batches)
    total_steps = min(t.max_steps or math.inf, steps_per_epoch * t.max_epochs)  # what the schedule plans for
    scheduler = config.build(cfg.scheduler, optimizer, num_training_steps=total_steps, steps_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "16-mixed")
    learner = Learner(model, trained, optimizer, scheduler, scaler, frozen)

    # Resume: weights, optimizer, schedule, RNG, counters and best metric from the checkpoint
    state = resume(run, learner, total_steps) if cfg.resume else TrainState()
    run.started -= state.elapsed
    trackers = loggers.build(cfg.logger, run_dir, cfg, enabled=ctx.is_main)  # after resume copied their history
    run.files = MetricsFiles(run_dir, task.metrics, enabled=ctx.is_main, trackers=trackers,
                             train_metrics=getattr(task, "train_metrics", None))
    untrained = None  # a language model's val metrics and answers before training, to compare with later ones
    if state.step == 0:
        if getattr(task, "validate_before_training", False):
            untrained = validate_untrained(run, model, val_loader, base_lr(optimizer))
        write_samples(run, model, state)

    # The epoch loop
    step_limit = t.max_steps or math.inf  # epochs bound the run otherwise (a resumed run may step differently)
    for epoch in range(state.epoch, t.max_epochs):
        if state.step >= step_limit or _out_of_patience(t, state):
            break  # max_steps reached or out of patience (also when resuming a run that had finished)
        _freeze_for_epoch(policy, learner, epoch, run)
        if ctx.enabled:  # each rank its own augmentations, reproducible per (seed, epoch, rank) when resumed
            torch.manual_seed(cfg.seed + 1_000_003 * epoch + ctx.rank)
        loading.set_epoch(train_loader, epoch)
        train_stats = train_one_epoch(run, learner, train_loader, state)
        state.epoch, state.batch = epoch + 1, 0
        row = {"epoch": state.epoch, "step": state.step, "lr": base_lr(optimizer),
               **{f"train_{k}": v for k, v in train_stats.items()}}
        improved = False
        if state.epoch % t.val_every_n_epochs == 0 or state.epoch == t.max_epochs or state.step >= step_limit:
            improved = validate(run, learner, val_loader, state, row)
        row["elapsed"] = time.perf_counter() - run.started
        run.files.epoch_row(row)
        save_checkpoint(run, learner, state, ["last", "best"] if improved else ["last"], row)
    run.files.close()
    if _out_of_patience(t, state):
        log.info(f"early stopping: {t.monitor} has not improved for {state.bad_validations} validations")

    # Test the best checkpoint on the held-out split, then write the summary
    best_dir = run_dir / "checkpoints" / "best"
    test = None
    if splits.test is not None:
        details = test_best(run, model, splits, state, loading.make_loader(splits, "test", eval_batch, options))
        test = {k: details[k] for k in (*task.metrics, "samples") if k in details}
        if ctx.is_main:  # per-class scores and the confusion matrix, for reports
            (run_dir / "test.json").write_text(json.dumps({**task.info(), **details}, indent=2))
    peaks = distributed.all_gather_objects(runtime.peak_memory(device))  # each process's, in rank order
    summary = {"name": cfg.name, "status": "early_stopped" if _out_of_patience(t, state) else "completed",
               "monitor": t.monitor, "mode": config.mode_of(t), "best_value": state.best,
               "best_epoch": state.best_epoch, "epochs": state.epoch, "steps": state.step, "test": test,
               "wall_time_s": round(time.perf_counter() - run.started, 2), "device": str(device),
               "precision": runtime.effective_precision(device, t.precision),
               "processes": ctx.world_size, "peak_memory_bytes": max(peaks),
               "peak_memory_per_process_bytes": peaks if ctx.enabled else None,
               "trainable_params": sum(r[1] for r in counts), "total_params": sum(r[2] for r in counts),
               "skipped_rows": splits.skipped,  # dataset.skip_bad_rows: rows left out, per file
               "train_mix": splits.mix,  # dataset.train_files: per file, its examples and how many train drew
               "val_before_training": untrained,
               "checkpoint": str(best_dir.absolute()), "run_dir": str(run_dir.absolute())}
    if ctx.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if cfg.report:
            write_report(run_dir)
        _track_the_end(trackers, summary, run_dir)
        console.print_key_values("summary", {k: v for k, v in summary.items() if k not in ("test", "run_dir")
                                             and v not in ({}, None)}
                                 | {f"test {k}": v for k, v in (test or {}).items()})
        example = getattr(task, "predict_example", "input=<a file or folder>")
        log.info(f"best checkpoint: {best_dir}\n  evaluate it:  sft-eval checkpoint={best_dir}\n"
                 f"  use it:       sft-predict checkpoint={best_dir} {example}")
    distributed.close()
    return float(state.best)


def write_report(run_dir: Path) -> None:
    """plots/ and report.html from the run's files (what `sft-report <run>` redraws). A failure here (a full
    disk, a broken font cache) is a warning: the run itself has finished and its files are written."""
    try:
        from sft_cli.results import (
            report,  # matplotlib: loaded only once the run is done
        )

        log.info(f"report: {report.run_report(run_dir)}")
    except Exception as e:
        log.warning(f"could not draw the run's report ({type(e).__name__}: {e}); sft-report {run_dir} retries")


def _track_the_end(trackers: loggers.Loggers, summary: dict, run_dir: Path) -> None:
    """The summary (test metrics), the confusion matrix and samples to the trackers; best checkpoint if asked."""
    trackers.summary(summary)
    if (run_dir / "plots" / "confusion.png").is_file():
        trackers.image("confusion_matrix", run_dir / "plots" / "confusion.png")
    if (run_dir / "samples.jsonl").is_file():
        trackers.text("samples", (run_dir / "samples.jsonl").read_text())
    trackers.checkpoint(run_dir / "checkpoints" / "best")
    trackers.close()


def _check_processes(cfg: DictConfig, run_dir: Path, ctx: distributed.Context, device: torch.device) -> None:
    """What can only be checked once the processes exist: the run folder and the DDP settings."""
    t = cfg.trainer
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


def _place(model: nn.Module, t: DictConfig, device: torch.device, ctx: distributed.Context) -> nn.Module:
    """The model on its device: SyncBatchNorm under DDP when asked, channels_last for convolutions on CUDA
    (NHWC convolutions use tensor cores) unless trainer.channels_last says otherwise."""
    if ctx.enabled and t.sync_batchnorm:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    has_convolutions = any(isinstance(m, nn.Conv2d) for m in model.modules())
    if t.channels_last or (t.channels_last is None and device.type == "cuda" and has_convolutions):
        model = model.to(memory_format=torch.channels_last)
    return model


def _check_something_trains(model: nn.Module, epoch: int, cfg: DictConfig) -> None:
    if not any(p.requires_grad for p in model.parameters()):
        policy = config.option_of("freeze", cfg.freeze._target_)
        raise SFTError(f"nothing trains in epoch {epoch + 1}: freeze={policy} leaves only stages whose own weights "
                       f"adapter=lora keeps frozen (a language model's lm_head). Drop freeze={policy} (freeze=none or "
                       f"freeze=lower work with adapters), or keep it with adapter=none.")


def _frozen_stages(policy, model: nn.Module, epoch: int) -> list[str]:
    """The policy's frozen stages for `epoch`, less the layers created from scratch (a new head), which train."""
    frozen = policy.frozen(model.sft.stages, stages.head_name(model), epoch)
    return [s for s in frozen if s not in model.sft.new_stages]


def _freeze_for_epoch(policy, learner: Learner, epoch: int, run: Run) -> None:
    """Set what trains in this epoch (and BatchNorm modes); rebuild the DDP wrapper when that changed."""
    frozen = _frozen_stages(policy, learner.model, epoch)
    freeze.apply(learner.model, learner.model.sft.stages, frozen)
    _check_something_trains(learner.model, epoch, run.cfg)
    if frozen != learner.frozen:
        log.info(f"epoch {epoch + 1}: unfreezing {sorted(set(learner.frozen) - set(frozen))}")
        learner.frozen = frozen
        learner.trained = distributed.wrap(learner.model, run.device, run.ctx)  # DDP fixes its buckets when built


def _out_of_patience(t: DictConfig, state: TrainState) -> bool:
    return bool(t.early_stopping_patience and state.bad_validations >= t.early_stopping_patience)


def train_one_epoch(run: Run, learner: Learner, loader, state: TrainState) -> dict:
    """One pass over `loader` (the rest of it, after a checkpoint written within this epoch). The task's
    windows accumulate on the device and are read only every trainer.log_every_n_steps optimizer steps, so the
    GPU never waits for the host in between. `learner.trained` may be a DDP wrapper: it averages gradients
    over processes on the backward pass of the last micro-batch of each step (no_sync() skips the others)."""
    t, task, device, ctx = run.cfg.trainer, run.task, run.device, run.ctx
    accumulate, every = t.accumulate_grad_batches, t.checkpoint_every_n_steps
    trainable = [p for p in learner.model.parameters() if p.requires_grad]
    window, epoch_totals = task.window(device), task.window(device)
    batches, epoch_rng = _epoch_batches(run, loader, state, (window, epoch_totals))
    step_weight = 0.0  # the weight of the summed losses backpropagated since the last optimizer step
    epoch_start = time.perf_counter()
    step_limit = t.max_steps or math.inf
    total_steps = min(step_limit, math.ceil(len(loader) / accumulate) * t.max_epochs)
    # outside a terminal (a log file, CI, nohup) a line every log_every_n_steps steps instead of the bar
    lines = console.StepLines(total_steps, state.step) if ctx.is_main and not console.draws_bars() else None
    with console.progress_bar(t.progress_bar and ctx.is_main) as bar:
        batches_left = min(len(loader), state.batch + (step_limit - state.step) * accumulate)
        bar_id = bar.add_task(f"epoch {state.epoch + 1}", total=batches_left, completed=state.batch, info="") \
            if bar else None
        for i, batch in enumerate(batches, start=state.batch):
            batch = loading.to_device(batch, device)
            stepping = (i + 1) % accumulate == 0 or i + 1 == len(loader)
            with distributed.gradient_sync(learner.trained, ctx, stepping):
                with runtime.autocast(device, t.precision):
                    summed, weight, record = task.loss(learner.trained, batch)
                learner.scaler.scale(summed).backward()
            step_weight = step_weight + weight
            window.add(record)
            epoch_totals.add(record)
            if not stepping:
                continue  # accumulate more gradient before stepping
            _optimizer_step(learner, trainable, t.gradient_clip_norm, step_weight, run)
            step_weight = 0.0
            state.step, state.batch = state.step + 1, i + 1
            if bar:
                bar.advance(bar_id, i + 1 - i // accumulate * accumulate)  # the step's micro-batches
            last = state.step >= step_limit or i + 1 == len(loader)
            if state.step % t.log_every_n_steps == 0 or last:  # and the epoch's last steps, however few
                record = {"epoch": state.epoch + 1, "step": state.step, "split": "train", **window.read(),
                          "lr": base_lr(learner.optimizer), "elapsed": time.perf_counter() - run.started}
                _check_finite(record["loss"], state.step, learner.optimizer)
                run.files.record(record)
                if bar:
                    bar.update(bar_id, info=f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
                                            f"{record['samples_per_s']:.0f} samples/s")
                if lines:
                    log.info(lines.line(record))
                window = task.window(device)
            if state.step >= step_limit:
                break
            if every and state.step % every == 0 and i + 1 < len(loader):
                within = {"epoch_rng": epoch_rng, "windows": [w.state_dict() for w in (window, epoch_totals)]}
                save_checkpoint(run, learner, state, ["last"], None, within)
    stats = epoch_totals.read()
    stats["samples_per_s"] = stats["samples"] / (time.perf_counter() - epoch_start)
    _check_finite(stats["loss"], state.step, learner.optimizer)
    return stats


def _epoch_batches(run: Run, loader, state: TrainState, windows: tuple) -> tuple:
    """The epoch's batch iterator and the RNG state it was drawn from. After a checkpoint written within this
    epoch, the loader is drawn again from that epoch's RNG state (the same order and augmentations, also from
    DataLoader workers, which are seeded from it), the batches trained before are skipped, and the RNG and the
    windows continue from the checkpoint: the rest of the epoch is bitwise what it would have been."""
    resumed, run.within_epoch = run.within_epoch, None
    if resumed is not None:
        runtime.set_rng_state(resumed["epoch_rng"])
    epoch_rng = runtime.rng_state()
    batches = iter(loader)
    if resumed is not None:
        for _ in range(min(state.batch, len(loader))):
            next(batches)
        runtime.set_rng_state(resumed["rng"])
        for window, saved in zip(windows, resumed["windows"]):
            window.load_state_dict(saved)
    return batches, epoch_rng


def _optimizer_step(learner: Learner, trainable: list[nn.Parameter], clip_norm: float | None, weight, run: Run) -> None:
    """Divide the summed gradients once by the weight of the whole step (every micro-batch of it, on every
    process: one all-reduce a step), clip, step, schedule. DDP averaged the gradients over the processes
    (a mean of sums), hence x world_size: the result is the gradient of the step's token- or example-weighted
    mean loss, exactly the loss the windows report."""
    total = distributed.all_reduce_sum(torch.as_tensor(weight, dtype=torch.float32, device=run.device))[0]
    grads = [p.grad for p in trainable if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, run.ctx.world_size / total.clamp(min=1e-12))  # one kernel for all, no host sync
    if clip_norm:
        learner.scaler.unscale_(learner.optimizer)
        nn.utils.clip_grad_norm_(trainable, clip_norm)
    learner.scaler.step(learner.optimizer)
    learner.scaler.update()
    learner.optimizer.zero_grad(set_to_none=True)
    if not isinstance(learner.scheduler, ReduceLROnPlateau):  # plateau steps per validation, with the metric
        learner.scheduler.step()


def _check_finite(value: float, step: int, optimizer) -> None:
    if not math.isfinite(value):
        raise SFTError(f"the training loss became {value} by step {step} (lr {base_lr(optimizer):.2e}): the run "
                       "diverged. Lower optimizer.lr, or set trainer.gradient_clip_norm (e.g. 1.0).")


def validate(run: Run, learner: Learner, loader, state: TrainState, row: dict) -> bool:
    """Evaluate on the validation split, update the best value and the patience count, record the metrics
    (metrics.jsonl, and the epoch's `row` for metrics.csv); return whether the monitored metric improved."""
    t = run.cfg.trainer
    val = evaluate(run.task, learner.model, loader, run.device, t.precision, "val")
    names = [k for k in run.task.metrics if k in val]  # a task may judge some only every few validations
    value = val.get(t.monitor.split("/", 1)[1])
    if isinstance(learner.scheduler, ReduceLROnPlateau) and value is not None:
        learner.scheduler.step(value)
    sign = 1 if config.mode_of(t) == "max" else -1
    improved = value is not None and (state.best is None or sign * (value - state.best) > 0)
    if improved:
        state.best, state.best_epoch, state.bad_validations, state.best_result = value, state.epoch, 0, val
    elif value is not None:  # not measured this time: neither better nor worse
        state.bad_validations += 1
    _record_val(run, val, names, state.epoch, state.step, row["lr"])
    row.update({f"val_{k}": val[k] for k in names})
    write_samples(run, learner.model, state)
    log.info(f"epoch {state.epoch}/{t.max_epochs}  train {_shown(row, 'train_', names)} | "
             f"val {_shown(row, 'val_', names)} | {console.rate(row['train_samples_per_s'])} samples/s"
             f"{'  (best)' if improved else ''}")
    return improved


def validate_untrained(run: Run, model: nn.Module, loader, lr: float) -> dict:
    """Record the validation metrics of the model before any step (epoch 0) in metrics.jsonl: the baseline
    the report and the plots show beside the trained model's. It is not a checkpoint, so never `best`. The
    RNG is left as it was (a DataLoader draws its workers' seeds from it): training is the same either way."""
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []):
        val = evaluate(run.task, model, loader, run.device, run.cfg.trainer.precision, "val")
    names = [k for k in run.task.metrics if k in val]
    _record_val(run, val, names, 0, 0, lr)
    log.info("before training: val " + " ".join(f"{k} {val[k]:.4f}" for k in names))
    return {k: val[k] for k in names}


def _record_val(run: Run, val: dict, names: list[str], epoch: int, step: int, lr: float) -> None:
    run.files.record({"epoch": epoch, "step": step, "split": "val", **{k: val[k] for k in (*names, "samples_per_s")},
                      "lr": lr, "elapsed": time.perf_counter() - run.started})


def test_best(run: Run, model: nn.Module, splits: Splits, state: TrainState, loader) -> dict:
    """The best checkpoint's result on the test split. A test split that is the validation split (the same
    file) was evaluated with the best weights already: that result is reused, not computed twice. The best
    weights are loaded only when the model does not hold them (the last validation was not the best)."""
    if splits.test is splits.val and state.best_result is not None:
        log.info("the test split is the validation split: its result is the best validation's (one pass, not two)")
        return state.best_result
    if state.best_epoch != state.epoch:
        if run.ctx.is_main or run.ctx.sharded:  # FSDP: every process reads its shards
            checkpoint.load_weights(run.run_dir / "checkpoints" / "best", model)
        if not run.ctx.sharded:
            distributed.broadcast_module(model, run.ctx)
    return evaluate(run.task, model, loader, run.device, run.cfg.trainer.precision, "test")


def write_samples(run: Run, model: nn.Module, state: TrainState) -> None:
    """Append what the task generates for a few validation inputs (a language model's greedy answers; nothing
    for a classifier) to samples.jsonl. Rank 0 only (every process generates under FSDP, whose forward passes
    are collective); the RNG is left as it was, so resume stays bitwise."""
    if not (run.ctx.is_main or distributed.is_sharded(model)):
        return
    with torch.random.fork_rng(devices=[run.device] if run.device.type == "cuda" else []), \
            distributed.generating(model):
        rows = run.task.generate_samples(model)
    if rows and run.ctx.is_main:
        with open(run.run_dir / "samples.jsonl", "a") as f:
            f.writelines(json.dumps({"epoch": state.epoch, "step": state.step, **row}) + "\n" for row in rows)


def _shown(row: dict, prefix: str, names: tuple[str, ...]) -> str:
    return " ".join(f"{name} {row[prefix + name]:.4f}" for name in names if prefix + name in row)


def evaluate(task: Task, model: nn.Module, loader, device: torch.device, precision: str, split: str) -> dict:
    """The task's metrics of `model` over `loader` (the `split` split), with its details (per-class scores,
    confusion matrix), then what the task judges of the model's generated outputs (task.judge)."""
    model.eval()
    start = time.perf_counter()
    window = task.window(device)
    batch = None
    # FSDP: as many forward passes as the others, counted before any (each pass is a collective: a count taken
    # after the loop would meet the busier processes' passes, and hang)
    behind = distributed.passes_behind(len(loader), model)
    with distributed.inference(model), runtime.autocast(device, precision):
        if behind and not len(loader):
            _some_batch(None, split)  # raises: this process has no batch to repeat
        for batch in loader:
            batch = loading.to_device(batch, device)
            window.add(task.loss(model, batch)[2])
        for _ in range(behind):
            task.loss(model, _some_batch(batch, split))
    result = window.read()
    result |= window.details() | {"samples_per_s": result["samples"] / (time.perf_counter() - start)}
    with distributed.inference(model), runtime.autocast(device, precision), distributed.generating(model):
        return result | task.judge(model, split)


def _some_batch(batch, split: str):
    if batch is None:  # this process's share of the split is empty
        raise SFTError(f"the {split} split has fewer examples than there are processes, so one process has none "
                       "to evaluate, and under trainer.strategy=fsdp every process must: give it more examples, or "
                       "use fewer processes.")
    return batch


def base_lr(optimizer) -> float:
    """The scheduled optimizer.lr, whatever head_lr or layer_decay do to each group (what gets logged)."""
    group = optimizer.param_groups[0]
    return group["lr"] / group.get("lr_scale", 1.0)


def save_checkpoint(run: Run, learner: Learner, state: TrainState, tags: list[str], row: dict | None,
                    within_epoch: dict | None = None) -> None:
    """checkpoints/step-N with `tags` pointed at it. Within an epoch (`within_epoch`: the epoch's RNG state and
    the windows' sums) it also holds what resume needs to continue from the next batch."""
    if not (run.ctx.is_main or run.ctx.sharded):  # FSDP: every process writes its shards
        return
    state.elapsed = time.perf_counter() - run.started
    sharded = run.ctx.sharded  # the optimizer state goes into the shards, not state.pt
    blob = {**({} if sharded else {"optimizer": learner.optimizer.state_dict()}),
            "scheduler": learner.scheduler.state_dict(),
            "scaler": learner.scaler.state_dict(), "rng": runtime.rng_state(), **state.to_checkpoint(),
            **(within_epoch or {})}
    meta = {**run.task.info(), "epoch": state.epoch, "step": state.step, "batch": state.batch, "metrics": row,
            "monitor": run.cfg.trainer.monitor, "best": state.best}
    checkpoint.save(run.run_dir / "checkpoints", tags, learner.model, blob, run.cfg, meta,
                    learner.optimizer if sharded else None)


def resume(run: Run, learner: Learner, total_steps: int) -> TrainState:
    """Load a checkpoint's training state: weights, optimizer state (its lr, momentum and weight decay
    included), schedule position, grad scaler, RNG, counters and best metric, and for a checkpoint written
    within an epoch where its batches continue. Everything else (epochs, schedule length, data, logging)
    follows the current config; the differences are listed in the log. The source run's checkpoints and
    metric history are copied into the new run folder, never moved. Under DDP every process reads the
    checkpoint (so it must be on storage they all see); the process count may differ from the source run's."""
    cfg = run.cfg
    ckpt = checkpoint.resolve(cfg.resume)
    meta = checkpoint.load_meta(ckpt)
    for key, value in run.task.info().items():
        if meta.get(key) != value:
            raise SFTError(f"resume={cfg.resume}: the checkpoint was trained on {key} {meta.get(key)}, but the "
                           f"configured data give {value}. Resume with the same dataset.")
    for line in config.differences(checkpoint.load_config(ckpt), cfg, ignore=("resume", "sweep")):
        log.warning(f"resume: {line} (the current value is used)")
    if learner.model.sft.adapter:  # an adapter continues only on the base it was trained on
        adapters.check_base(meta.get("adapter_base") or {}, learner.model, ckpt, adapters.base_key(cfg.model))
    written = "fsdp" if shards.has_shards(ckpt) else "ddp"  # sharded weights and optimizer state, or whole
    if written != run.ctx.strategy:
        raise SFTError(f"resume={cfg.resume} was written with trainer.strategy={written}: resume it with "
                       f"trainer.strategy={written} (on any number of processes).")
    checkpoint.load_weights(ckpt, learner.model)
    blob = checkpoint.load_state(ckpt)
    optimizer, scheduler = learner.optimizer, learner.scheduler
    if isinstance(scheduler, OneCycleLR) and blob["scheduler"].get("total_steps") != total_steps:
        raise SFTError(f"resume={cfg.resume}: scheduler=onecycle was planned for {blob['scheduler'].get('total_steps')}"
                       f" steps and cannot be stretched to {total_steps}: keep trainer.max_epochs/max_steps as they "
                       "were, or use a scheduler such as cosine, whose length follows the current config.")
    try:
        if run.ctx.sharded:
            shards.load_optimizer(ckpt, learner.model, optimizer)
        else:
            optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
    except (ValueError, KeyError) as e:
        raise SFTError(f"resume={cfg.resume}: its optimizer/scheduler state does not fit the configured "
                       f"optimizer={type(optimizer).__name__}, scheduler={type(scheduler).__name__} ({e}). "
                       "Resume with the optimizer and scheduler the run was started with.") from e
    if learner.scaler.is_enabled() and blob["scaler"]:  # empty when the run was saved without 16-mixed
        learner.scaler.load_state_dict(blob["scaler"])
    runtime.set_rng_state(blob["rng"])
    state = TrainState.from_checkpoint(blob)
    if state.batch:
        run.within_epoch = {key: blob[key] for key in ("epoch_rng", "rng", "windows")}
    if run.ctx.is_main:
        checkpoint.clear_stale(ckpt.resolve().parent)  # a killed save's temporary folder in the source run
        checkpoint.copy_history(ckpt, run.run_dir, state.epoch, state.step)
        loggers.continue_from(ckpt.resolve().parent.parent, run.run_dir, step=state.step)  # the same tracker runs
    log.info(f"resumed from {ckpt.resolve()} at epoch {state.epoch}, step {state.step}"
             f"{f' (batch {state.batch} of epoch {state.epoch + 1})' if state.batch else ''} "
             f"(best {state.best} at epoch {state.best_epoch})")
    return state
