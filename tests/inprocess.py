"""sft-train's recipe run inside the test process: the config composed as the command line composes it, then
train(). For assertions about what training does; the entry points themselves (exit codes, messages, kills,
torchrun) are tested as subprocesses (conftest.run_cli)."""

from pathlib import Path


def train_here(overrides: list[str], run_dir: Path) -> float:
    """The best value of trainer.monitor of `sft-train overrides... hydra.run.dir=run_dir`, run in this process."""
    from hydra import compose, initialize_config_dir

    from sft_cli import config
    from sft_cli.train import train

    with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return train(cfg, Path(run_dir))
