"""sft-train's recipe run inside the test process: the config composed as the command line composes it, then
train(). For assertions about what training does; the entry points themselves (exit codes, messages, kills,
torchrun) are tested as subprocesses (conftest.run_cli)."""

import contextlib
from pathlib import Path

import pytest

DEAD_PROXY = "http://127.0.0.1:9"


def train_here(overrides: list[str], run_dir: Path) -> float:
    """The best value of trainer.monitor of `sft-train overrides... hydra.run.dir=run_dir`, run in this process."""
    from hydra import compose, initialize_config_dir

    from sft_cli import config
    from sft_cli.train import train

    with initialize_config_dir(config.find_config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    return train(cfg, Path(run_dir))


@contextlib.contextmanager
def offline(cwd: Path):
    """What conftest.run_cli gives sft-train, for runs in this process: `cwd` as the working folder (relative
    paths resolve from it), the torch hub and sft-cli caches under it, and every URL failing at once."""
    with pytest.MonkeyPatch.context() as env:
        env.chdir(cwd)
        for key in ("NO_PROXY", "no_proxy", "HYDRA_FULL_ERROR"):
            env.delenv(key, raising=False)
        for key in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
            env.setenv(key, DEAD_PROXY)
        env.setenv("TORCH_HOME", str(Path(cwd) / "torch_home"))
        env.setenv("SFT_CLI_CACHE", str(Path(cwd) / "sft_cache"))
        yield


def train_offline(overrides: list[str], run_dir: Path, cwd: Path) -> float:
    """train_here in `cwd` with conftest.run_cli's environment (run_dir relative to cwd, as hydra.run.dir)."""
    with offline(cwd):
        return train_here(overrides, Path(cwd) / run_dir)
