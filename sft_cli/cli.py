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


@hydra.main(config_path=config.find_config_dir(), config_name="train", version_base="1.3")
def train_main(cfg: DictConfig) -> float:
    """sft-train: returns the best monitored value, which Hydra sweepers optimise."""
    config.check(cfg)
    from sft_cli.train import train  # torch and torchvision load here, once the config is known to be good

    return train(cfg, Path(HydraConfig.get().runtime.output_dir))


@hydra.main(config_path=config.find_config_dir(), config_name="eval", version_base="1.3")
def _eval_main(cfg: DictConfig) -> None:
    config.require(cfg)
    from sft_cli.eval import evaluate_checkpoint

    evaluate_checkpoint(cfg, Path(HydraConfig.get().runtime.output_dir))


def eval_main() -> None:
    """sft-eval: the checkpoint's own config.yaml is put under the eval options before Hydra composes, so
    any key of the training run can be overridden as `key=value` (dataset.root=..., trainer.device=...)."""
    ConfigStore.instance().store(name="_checkpoint_", node=_checkpoint_config(sys.argv[1:]))
    _eval_main()


def _checkpoint_config(argv: list[str]) -> DictConfig:
    given = [a.split("=", 1)[1] for a in argv if a.startswith("checkpoint=")]
    if not given:
        return OmegaConf.create({})  # Hydra then reports `checkpoint` as missing
    from sft_cli import checkpoint

    try:
        return checkpoint.load_config(checkpoint.resolve(given[-1]))
    except SFTError as e:  # Hydra is not running yet, so report as it would
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"Error: {e}", file=sys.stderr)
        sys.exit(1)
