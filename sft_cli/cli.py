"""The console entry points and their command lines. Hydra composes and checks the config before torch is
imported, so `--help`, `--cfg job` and config mistakes answer in about a second; the recipe itself is in
train.py, what a sweep needs in sweep.py. torchrun starts this module directly:
    torchrun --standalone --nproc_per_node=4 -m sft_cli.cli +experiment=cifar10_resnet18"""

import contextlib
import functools
import logging
import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from sft_cli import checks, config, disk, sweep
from sft_cli.errors import SFTError
from sft_cli.extras import install_command

log = logging.getLogger("sft_cli.cli")

# An explicit hydra.run.dir is claimed with a lock on this file in it, held until the process exits.
LOCK_FILE = ".sft-cli.lock"
# Set by the process that holds the claim, so that the processes it starts (torchrun's, for
# trainer.devices=N) may use the folder: its resolved path.
CLAIMED_ENV = "SFT_CLI_RUN_DIR_CLAIMED"
_claim = None  # this process's open lock file: closing it (at exit) releases the folder


def train_main() -> None:
    """sft-train (and `torchrun ... -m sft_cli.cli`)."""
    argv = sys.argv[1:]
    _refuse_unquoted(argv)
    _refuse_unknown_options(argv)
    _refuse_bare_train(argv)
    _refuse_used_run_dir(argv, "sft-train")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        _join_torchrun(argv)
    if os.environ.get("RANK", "0") == "0":  # torchrun's other ranks write nothing there
        _claim_run_dir(argv)
    _train()


def _join_torchrun(argv: list[str]) -> None:
    if {"-m", "--multirun"} & set(argv):
        _fail(SFTError("-m (a sweep) cannot run under torchrun: sweep with sft-train -m ... trainer.devices=N, "
                       "which starts torchrun for each run."))
    if os.environ.get("RANK", "0") != "0":
        # Only rank 0's Hydra makes the run folder (its path reaches the others in train.py); the other
        # ranks write no folder and no log, so there is one set of artefacts however many processes run.
        sys.argv += ["hydra.run.dir=.", "hydra.output_subdir=null", "hydra/job_logging=disabled",
                     "hydra/hydra_logging=disabled"]


def eval_main() -> None:
    """sft-eval: the checkpoint's own config.yaml is put under the eval options before Hydra composes, so
    any key of the training run can be overridden as `key=value` (dataset.root=..., trainer.device=...)."""
    _prepare_checkpoint_command(sys.argv[1:], "sft-eval")
    _eval()


def predict_main() -> None:
    """sft-predict: like sft-eval, composed over the checkpoint's own config."""
    sys.argv = [_quote_text(a) for a in sys.argv]
    _prepare_checkpoint_command(sys.argv[1:], "sft-predict")
    _predict()


def _prepare_checkpoint_command(argv: list[str], command: str) -> None:
    """What sft-eval and sft-predict check and set up before Hydra starts: the command line's grammar and
    group options, a run folder that is free, the checkpoint's config under the command's, the folder's claim."""
    _refuse_unquoted(argv)
    _refuse_unknown_options(argv)
    _refuse_used_run_dir(argv, command)
    _store_checkpoint_config(argv)
    _claim_run_dir(argv)


QUOTED = ("text", "prompt")  # free text: handed to Hydra as one quoted string


def _quote_text(arg: str) -> str:
    # text="Great, loved it" or prompt="Summarise: a, b" would otherwise be parsed by Hydra's grammar (a comma
    # means a sweep, a lone quote is a syntax error, 5 becomes an int): hand the text over as one quoted string.
    key, sep, value = arg.partition("=")
    if not sep or key not in QUOTED or value[:1] in ("'", '"'):
        return arg
    # inside Hydra's quotes only backslashes before a quote (or at the end) are escapes
    value = re.sub(r"(\\+)(?='|$)", lambda m: m.group(1) * 2, value).replace("'", "\\'")
    return f"{key}='{value}'"


def _refuse_unknown_options(argv: list[str]) -> None:
    """`group=option` (also +group=, a sweep's a,b and a list's [a,b]) naming no file of configs/<group>/ is
    refused with the options there. Hydra says it too, but ends with its config search path, below the
    options, where a user reads last."""
    import difflib

    root = Path(config.find_config_dir())
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if not sep or arg.startswith(("-", "~")) or "." in key or "/" in key or "(" in value or "$" in value:
            continue  # not a group choice, or Hydra's own groups, sweep functions, interpolations
        options = sorted(path.stem for path in (root / key).glob("*.yaml")) if (root / key).is_dir() else []
        for name in (n for n in re.split(r"[\s,\[\]'\"]+", value) if n and n != "null"):
            if options and name not in options:
                near = difflib.get_close_matches(name, options, n=1)
                _fail(SFTError(f"{arg}: configs/{key}/ has no option {name!r}"
                               + (f" (did you mean {key}={near[0]}?)" if near else "")
                               + f". The options of {key}: {', '.join(options)}"))


def _refuse_unquoted(argv: list[str]) -> None:
    """A value Hydra's grammar reads only inside quotes (a path with non-ASCII letters or spaces) is refused
    with the quoted form to type: Hydra's own lexer error gives no hint."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in (a for a in argv if "=" in a and not a.startswith("-")):
        key, _, value = arg.partition("=")
        odd = [c for c in value if not c.isascii()] or [c for c in value if c.isspace()]
        if not odd or value[:1] in ("'", '"'):
            continue
        try:
            parser.parse_override(arg)
        except HydraException:  # its lexer's error
            _fail(SFTError(f"{arg}: Hydra reads {odd[0]!r} only inside quotes. Quote the value: {key}='{value}' "
                           f"(in a shell, quote it twice: \"{key}='{value}'\")"))


def export_main() -> None:
    """sft-export: a transformers checkpoint as a save_pretrained() folder."""
    _refuse_unquoted(sys.argv[1:])
    _refuse_unknown_options(sys.argv[1:])
    _store_checkpoint_config(sys.argv[1:])
    _export()


def _train() -> None:
    """sft-train's Hydra app, after the two checks Hydra cannot make before a sweep's first run."""
    _require_plugins(sys.argv[1:])
    args = _parse(sys.argv[1:])
    if _is_sweep(args) and not _prints_only(args):
        try:
            sweep.check_config(args.overrides)
        except SFTError as e:
            _fail(e)
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
                                   + install_command(extra)))


def _parse(argv: list[str]):
    """Hydra's own reading of the command line: flags (args.multirun, args.cfg, ...) and args.overrides."""
    from hydra._internal.utils import get_args_parser

    return get_args_parser().parse_known_args(argv)[0]


def _is_sweep(args) -> bool:
    return bool(args.multirun) or "hydra.mode=MULTIRUN" in args.overrides


def _prints_only(args) -> bool:
    """A flag with which Hydra prints something, or runs another config, instead of a run of ours."""
    return any((args.cfg, args.help, args.hydra_help, args.info, args.shell_completion, args.config_path,
                args.config_name, args.config_dir, args.experimental_rerun))


def _fix_last(job):
    """A job's SFTError printed as _fail prints it: the message, whose last line is the fix, and exit code 1
    (Hydra would add a line about HYDRA_FULL_ERROR below it, for a traceback that does not exist)."""
    @functools.wraps(job)
    def run(*args, **kwargs):
        try:
            return job(*args, **kwargs)
        except SFTError as e:
            _fail(e)
    return run


def _refuse_bare_train(argv: list[str]) -> None:
    """A bare sft-train would train the defaults (CIFAR-10 and ImageNet weights, both downloaded, and a
    7x7-stem ResNet on 32x32 images): ask for an experiment instead, listing them."""
    args = _parse(argv)
    if _prints_only(args) or {o.split("=", 1)[0].lstrip("+~") for o in args.overrides} & {"experiment", "dataset"}:
        return
    names = sorted(p.stem for p in (Path(config.find_config_dir()) / "experiment").glob("*.yaml"))
    _fail(SFTError(f"sft-train needs an experiment: +experiment=NAME, one of: {', '.join(names)}. Start with the "
                   "offline quickstart: sft-train +experiment=quickstart (or choose dataset=... model=... yourself; "
                   "sft-train --help lists the options)."))


@hydra.main(config_path=config.find_config_dir(), config_name="train", version_base="1.3")
@_fix_last
def _train_job(cfg: DictConfig) -> float | None:
    """One run. In a sweep (-m), a run that an earlier sweep finished is reused with sweep.skip_finished=true,
    and an error is recorded as a failed run (summary.json with the reason) instead of stopping the sweep."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode != RunMode.MULTIRUN:
        with _error_in_log():
            return _run_training(cfg, run_dir)
    overrides = list(hydra_cfg.overrides.task)
    if cfg.sweep.skip_finished:
        root = Path(hydra_cfg.runtime.cwd, cfg.sweep.root)
        found = sweep.find_finished(root, Path(hydra_cfg.sweep.dir), run_dir, overrides)
        if found is not None:
            return sweep.reuse(found, run_dir, overrides)
        sweep.set_aside_earlier_attempt(run_dir)
    try:
        with sweep.machine_share(cfg, hydra_cfg):
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
    checks.check(cfg)  # train() checks too; this answers before torch loads
    from sft_cli.train import train

    return train(cfg, run_dir)  # sweepers optimise the returned value


@contextlib.contextmanager
def _error_in_log():
    """A failed run's train.log ends with why it failed (a bug's traceback too). Only the log files get it:
    Hydra prints the error on the terminal, and a log.error() would print it there a second time."""
    try:
        yield
    except SFTError as e:
        _log_to_files(f"run failed: {e}", exc_info=False)
        raise
    except Exception as e:
        _log_to_files(f"run failed: {type(e).__name__}: {e}", exc_info=True)
        raise


def _log_to_files(message: str, exc_info: bool) -> None:
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None,
                            sys.exc_info() if exc_info else None)
    for handler in logging.getLogger().handlers:  # Hydra's job_logging: the console and <job>.log
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


@hydra.main(config_path=config.find_config_dir(), config_name="eval", version_base="1.3")
@_fix_last
def _eval(cfg: DictConfig) -> None:
    checks.require(cfg)
    from sft_cli.eval import evaluate_checkpoint

    evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(config_path=config.find_config_dir(), config_name="predict", version_base="1.3")
@_fix_last
def _predict(cfg: DictConfig) -> None:
    checks.require(cfg)
    config.build(cfg.task).predict(cfg, Path(HydraConfig.get().runtime.output_dir))  # each task predicts its way


@hydra.main(config_path=config.find_config_dir(), config_name="export", version_base="1.3")
@_fix_last
def _export(cfg: DictConfig) -> None:
    checks.require(cfg)
    from sft_cli.export import export

    export(cfg)


def _fail(error: SFTError):
    """Report an error found before Hydra starts the way Hydra reports it: one message, exit code 1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise error
    print(f"Error: {error}", file=sys.stderr)
    sys.exit(1)


def _refuse_used_run_dir(argv: list[str], command: str) -> None:
    # Hydra writes .hydra/ and the log into the run folder before any code of ours runs (and ignores
    # errors raised by its callbacks), so an explicit hydra.run.dir (+ and ++ spellings too) is checked here.
    # The default folder, <time>_<pid>, is new by construction.
    given = config.arg(argv, "hydra.run.dir")
    if given is None:
        return
    if not given.strip():  # Path("") is the current folder: the run would be written among the user's files
        _fail(SFTError("hydra.run.dir= is empty: give the folder for the run (a new or empty one), or leave "
                       "hydra.run.dir out for the default outputs/<name>/<date>/<time>_<pid>."))
    run_dir = Path(given).resolve()
    used = [n for n in ("summary.json", "metrics.jsonl", "checkpoints", "eval.json") if (run_dir / n).exists()]
    if used:
        _fail(SFTError(f"hydra.run.dir={run_dir} already holds a run ({', '.join(used)}); it is left untouched. "
                       "Leave hydra.run.dir at its default or choose an empty folder."))
    ckpt = config.arg(argv, "checkpoint")
    if ckpt:
        ckpt = Path(ckpt).resolve()
        protected = [ckpt, ckpt / "checkpoints"] + ([ckpt.parent] if ckpt.parent.name == "checkpoints" else [])
        if any(run_dir.is_relative_to(p) for p in protected):
            _fail(SFTError(f"hydra.run.dir={run_dir} is inside the checkpoint {ckpt}: {command} never writes "
                           "there. Leave hydra.run.dir at its default or choose another folder."))


def _claim_run_dir(argv: list[str]) -> None:
    """Two commands started together with the same hydra.run.dir would both find it empty and write over
    each other: the first to lock LOCK_FILE in it owns it until it exits, before Hydra writes anything there,
    and the other stops. The default folder (<time>_<pid>) needs no claim."""
    global _claim
    given, args = config.arg(argv, "hydra.run.dir"), _parse(argv)
    if given is None or "${" in given or _is_sweep(args) or _prints_only(args):
        return  # an interpolation names a folder only Hydra can resolve; a sweep or --cfg uses no run folder
    run_dir = Path(given).resolve()
    if os.environ.get(CLAIMED_ENV) == str(run_dir):
        return  # started by the process that holds it (distributed.launch's torchrun)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        held = disk.lock(run_dir / LOCK_FILE, wait=False)
    except OSError as e:  # an existing file, a path under /proc, a read-only disk
        _fail(SFTError(f"hydra.run.dir={given} cannot be a run folder ({e.strerror or e}): give a folder path that "
                       "can be created and written, or leave hydra.run.dir out for the default."))
    if held is None:
        pid = (run_dir / LOCK_FILE).read_text().strip() or "unknown"
        _fail(SFTError(f"hydra.run.dir={run_dir} is in use by another sft-cli process (pid {pid}); it is left "
                       "untouched. Wait for that process to end, or choose another folder."))
    held.truncate(0)
    held.write(str(os.getpid()))
    held.flush()
    _claim = held
    os.environ[CLAIMED_ENV] = str(run_dir)


def _store_checkpoint_config(argv: list[str]) -> None:
    """Put the config.yaml of the checkpoint named by `checkpoint=` where eval/predict/export.yaml's
    defaults list expects it (`_checkpoint_`); empty without one, and Hydra reports `checkpoint` missing."""
    path, node = config.arg(argv, "checkpoint"), OmegaConf.create({})
    if path is not None:
        from sft_cli.training import checkpoint

        try:
            node = checkpoint.load_config(checkpoint.resolve(path))
        except SFTError as e:
            _fail(e)
    ConfigStore.instance().store(name="_checkpoint_", node=node)


if __name__ == "__main__":  # torchrun --nproc_per_node=N -m sft_cli.cli ... is sft-train
    train_main()
