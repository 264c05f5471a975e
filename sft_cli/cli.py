"""The console entry points. Hydra composes and checks the config before torch is imported, so `--help`,
`--cfg job` and config mistakes answer in about a second; the recipe itself is in train.py."""

import contextlib
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sft_cli import config
from sft_cli.errors import SFTError

log = logging.getLogger("sft_cli.cli")


def train_main() -> None:
    """sft-train (and `python -m sft_cli.train`, as torchrun starts it)."""
    _refuse_used_run_dir(sys.argv[1:])
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if {"-m", "--multirun"} & set(sys.argv):
            _fail(SFTError("-m (a sweep) cannot run under torchrun: sweep with sft-train -m ... trainer.devices=N, "
                           "which starts torchrun for each run."))
        if os.environ.get("RANK", "0") != "0":
            # Only rank 0's Hydra makes the run folder (its path reaches the others in train.py); the other
            # ranks write no folder and no log, so there is one set of artefacts however many processes run.
            sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                         "hydra/hydra_logging=disabled"]
    _train()


def eval_main() -> None:
    """sft-eval: the checkpoint's own config.yaml is put under the eval options before Hydra composes, so
    any key of the training run can be overridden as `key=value` (dataset.root=..., trainer.device=...)."""
    _refuse_used_run_dir(sys.argv[1:])
    _store_checkpoint_config(sys.argv[1:])
    _eval()


def predict_main() -> None:
    """sft-predict: like sft-eval, composed over the checkpoint's own config."""
    _refuse_used_run_dir(sys.argv[1:])
    _store_checkpoint_config(sys.argv[1:])
    sys.argv = [_quote_text(a) for a in sys.argv]
    _predict()


def _quote_text(arg: str) -> str:
    # text="Great, loved it" would otherwise be parsed by Hydra's grammar (a comma means a sweep, a lone
    # quote is a syntax error, 5 becomes an int): hand the text over as one quoted string.
    if not arg.startswith("text=") or arg[5:6] in ("'", '"'):
        return arg
    return "text='" + arg[5:].replace("\\", "\\\\").replace("'", "\\'") + "'"


def export_main() -> None:
    """sft-export: a transformers checkpoint as a save_pretrained() folder."""
    _store_checkpoint_config(sys.argv[1:])
    _export()


def _train() -> None:
    """sft-train's Hydra app, after the two checks Hydra cannot make before a sweep's first run."""
    _require_plugins(sys.argv[1:])
    _check_sweep_config(sys.argv[1:])
    _train_job()


# Options that need an optional Hydra plugin: (the override, the plugin's module, the pip extra that installs it)
PLUGINS = [("hparams_search=", "hydra_plugins.hydra_optuna_sweeper", "search"),
           ("hydra/sweeper=optuna", "hydra_plugins.hydra_optuna_sweeper", "search"),
           ("hydra/launcher=joblib", "hydra_plugins.hydra_joblib_launcher", "search"),
           ("hydra/launcher=submitit", "hydra_plugins.hydra_submitit_launcher", "slurm"),
           ("launcher=slurm", "hydra_plugins.hydra_submitit_launcher", "slurm")]


def _require_plugins(argv: list[str]) -> None:
    # Without the plugin Hydra says only "Could not find 'hydra/sweeper/optuna'"; say what to install.
    import importlib.util

    for arg in argv:
        for prefix, module, extra in PLUGINS:
            if arg.lstrip("+~").startswith(prefix) and not arg.endswith("=null"):
                if importlib.util.find_spec(module) is None:
                    _fail(SFTError(f"{arg} needs {module.split('.')[1].replace('_', '-')}, which is not installed: "
                                   f'pip install "sft-cli[{extra}]"'))


def _check_sweep_config(argv: list[str]) -> None:
    """Under -m every run composes its own config, and a run's error is recorded as a failed run, not raised.
    A mistake that all runs share (trainer.monitor=val/acc) would fail them one by one, so the config is
    checked here once, with the swept overrides left out, and a mistake stops the sweep before its first run."""
    from hydra._internal.utils import get_args_parser

    args, _ = get_args_parser().parse_known_args(argv)
    info = (args.cfg, args.help, args.hydra_help, args.info, args.shell_completion, args.config_path,
            args.config_name, args.config_dir, args.experimental_rerun)
    if not (args.multirun or "hydra.mode=MULTIRUN" in args.overrides) or any(info):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
            cfg = compose("train", overrides=[o.input_line for o in parsed if not o.is_sweep_override()])
    except Exception:  # a syntax or composition error: Hydra reports it next, also before any run
        return
    missing = OmegaConf.missing_keys(cfg)
    for key in {o.key_or_group for o in parsed if o.is_sweep_override()} & missing:
        OmegaConf.update(cfg, key, "<swept>")  # a required value given only as swept values is not missing
    try:
        config.check(cfg)
    except SFTError as e:
        _fail(e)
    given = _arg(argv, "hydra.sweep.dir")  # the default folder is new by construction
    if given and not cfg.sweep.skip_finished and any(Path(given).glob("*/summary.json")):
        _fail(SFTError(f"hydra.sweep.dir={given} already holds the runs of an earlier sweep; they are left "
                       "untouched. Choose a new folder, or add sweep.skip_finished=true to reuse its finished "
                       "runs and run the others again."))


@hydra.main(config_path=config.find_config_dir(), config_name="train", version_base="1.3")
def _train_job(cfg: DictConfig) -> float | None:
    """One run. In a sweep (-m), a run that an earlier sweep finished is reused with sweep.skip_finished=true,
    and an error is recorded as a failed run (summary.json with the reason) instead of stopping the sweep."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return _run_training(cfg, run_dir)
    from sft_cli import sweep

    overrides = list(hydra_cfg.overrides.task)
    if cfg.sweep.skip_finished:
        root = Path(hydra_cfg.runtime.cwd, cfg.sweep.root)
        found = sweep.find_finished(root, Path(hydra_cfg.sweep.dir), run_dir, overrides)
        if found is not None:
            return sweep.reuse(found, run_dir, overrides)
        sweep.set_aside_earlier_attempt(run_dir)
    try:
        with _machine_share(cfg, hydra_cfg):
            value = _run_training(cfg, run_dir)
    except Exception as e:
        reason = str(e) if isinstance(e, SFTError) else f"{type(e).__name__}: {e}"
        log.error(f"run failed: {reason}", exc_info=not isinstance(e, SFTError))  # a bug's traceback too
        sweep.record_failure(run_dir, cfg, overrides, reason)
        # Not NaN: hydra-optuna-sweeper 1.3 crashes on a NaN result (hydra#2237), while a value that is not a
        # number marks the trial failed and the search goes on; Hydra's basic sweeper ignores the value.
        return None
    sweep.record_overrides(run_dir, overrides)
    return value


def _run_training(cfg: DictConfig, run_dir: Path) -> float:
    config.check(cfg)  # train() checks too; this answers before torch loads
    from sft_cli.train import train

    return train(cfg, run_dir)  # sweepers optimise the returned value


@contextlib.contextmanager
def _machine_share(cfg: DictConfig, hydra_cfg: DictConfig):
    """hydra/launcher=joblib runs several runs at once on this machine. Each gets cores / runs torch threads
    (OMP_NUM_THREADS, when you set it) and, with several GPUs, a GPU of its own: the first one that no other
    run of the sweep holds (a lock file in the sweep folder)."""
    at_once = config.jobs_at_once(hydra_cfg.launcher)
    if "joblib" not in hydra_cfg.launcher._target_ or at_once == 1:
        yield
        return
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or max(1, (os.cpu_count() or 1) // at_once)))
    gpus = torch.cuda.device_count()
    if gpus < 2 or cfg.trainer.devices > 1 or cfg.trainer.device not in ("auto", "cuda"):
        log.info(f"{at_once} runs at once: {torch.get_num_threads()} CPU threads each")
        yield
        return
    import fcntl

    locks = Path(hydra_cfg.sweep.dir) / ".gpu_locks"
    locks.mkdir(parents=True, exist_ok=True)
    gpu, held = hydra_cfg.job.num % gpus, None  # every GPU taken (more runs at once than GPUs): share by number
    for i in range(gpus):
        lock = open(locks / str(i), "w")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        gpu, held = i, lock
        break
    cfg.trainer.device = f"cuda:{gpu}"
    log.info(f"{at_once} runs at once: this one on cuda:{gpu} with {torch.get_num_threads()} CPU threads")
    try:
        yield
    finally:
        if held is not None:
            held.close()  # releases the lock


@hydra.main(config_path=config.find_config_dir(), config_name="eval", version_base="1.3")
def _eval(cfg: DictConfig) -> None:
    config.require(cfg)
    from sft_cli.eval import evaluate_checkpoint

    evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(config_path=config.find_config_dir(), config_name="predict", version_base="1.3")
def _predict(cfg: DictConfig) -> None:
    config.require(cfg)
    from sft_cli.predict import predict

    predict(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(config_path=config.find_config_dir(), config_name="export", version_base="1.3")
def _export(cfg: DictConfig) -> None:
    config.require(cfg)
    from sft_cli.export import export

    export(cfg)


def _arg(argv: list[str], key: str) -> str | None:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(f"{key}=")]
    return values[-1] if values else None


def _fail(error: SFTError):
    """Report an error found before Hydra starts the way Hydra reports it: one message, exit code 1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"Error: {error}", file=sys.stderr)
    sys.exit(1)


def _refuse_used_run_dir(argv: list[str]) -> None:
    # Hydra writes .hydra/ and the log into the run folder before any code of ours runs (and ignores
    # errors raised by its callbacks), so an explicit hydra.run.dir is checked here. The default folder,
    # <time>_<pid>, is new by construction.
    given = _arg(argv, "hydra.run.dir")
    if given is None:
        return
    run_dir = Path(given).resolve()
    used = [n for n in ("summary.json", "metrics.jsonl", "checkpoints", "eval.json") if (run_dir / n).exists()]
    if used:
        _fail(SFTError(f"hydra.run.dir={run_dir} already holds a run ({', '.join(used)}); it is left untouched. "
                       "Leave hydra.run.dir at its default or choose an empty folder."))
    ckpt = _arg(argv, "checkpoint")
    if ckpt:
        ckpt = Path(ckpt).resolve()
        protected = [ckpt, ckpt / "checkpoints"] + ([ckpt.parent] if ckpt.parent.name == "checkpoints" else [])
        if any(run_dir.is_relative_to(p) for p in protected):
            _fail(SFTError(f"hydra.run.dir={run_dir} is inside the checkpoint {ckpt}: sft-eval never writes "
                           "there. Leave hydra.run.dir at its default or choose another folder."))


def _store_checkpoint_config(argv: list[str]) -> None:
    """Put the config.yaml of the checkpoint named by `checkpoint=` where eval/predict/export.yaml's
    defaults list expects it (`_checkpoint_`); empty without one, and Hydra reports `checkpoint` missing."""
    path, node = _arg(argv, "checkpoint"), OmegaConf.create({})
    if path is not None:
        from sft_cli import checkpoint

        try:
            node = checkpoint.load_config(checkpoint.resolve(path))
        except SFTError as e:
            _fail(e)
    ConfigStore.instance().store(name="_checkpoint_", node=node)
