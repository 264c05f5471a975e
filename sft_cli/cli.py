"""The console entry points. Hydra composes and checks the config before torch is imported, so `--help`,
`--cfg job` and config mistakes answer in about a second; the recipe itself is in train.py."""

import os
import sys
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from sft_cli import config
from sft_cli.errors import SFTError


def train_main() -> None:
    """sft-train (and `python -m sft_cli.train`, as torchrun starts it)."""
    _refuse_used_run_dir(sys.argv[1:])
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


@hydra.main(config_path=config.find_config_dir(), config_name="train", version_base="1.3")
def _train(cfg: DictConfig) -> float:
    config.check(cfg)  # train() checks too; this answers before torch loads
    from sft_cli.train import train

    return train(cfg, Path(HydraConfig.get().runtime.output_dir))  # sweepers optimise the returned value


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
    from sft_cli.predict import export

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
