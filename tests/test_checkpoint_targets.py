"""A checkpoint is data, never code: a config.yaml whose `_target_` names anything but what sft-cli's own configs
build is refused by every command that loads a checkpoint, before anything is instantiated."""

import pickle
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from sft_cli.errors import SFTError
from sft_cli.training import checkpoint

LEGACY_TEXT = Path(__file__).parent / "legacy" / "main-0ea1499" / "text"


class Payload:
    """Unpickling it writes `marker`: what a hostile checkpoint's pickle would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def hostile_checkpoint(folder: Path, marker: Path) -> Path:
    """A checkpoint folder whose config.yaml builds its task with torch.load of a pickle that writes marker."""
    ckpt = folder / "checkpoints" / "step-00000004"
    ckpt.mkdir(parents=True)
    (folder / "payload.pkl").write_bytes(pickle.dumps(Payload(marker)))
    cfg = OmegaConf.create(LEGACY_TEXT.joinpath("config.yaml").read_text().replace("@ROOT@", str(folder)))
    cfg.task = {"_target_": "torch.load", "f": str(folder / "payload.pkl"), "weights_only": False}  # built first
    (ckpt / checkpoint.CONFIG_FILE).write_text(OmegaConf.to_yaml(cfg))
    (ckpt / checkpoint.META_FILE).write_text(LEGACY_TEXT.joinpath("meta.json").read_text())
    (ckpt / checkpoint.MODEL_FILE).write_bytes(b"")
    (ckpt / checkpoint.STATE_FILE).write_bytes(b"")
    (folder / "checkpoints" / "best").symlink_to(ckpt.name)
    (folder / "checkpoints" / "last").symlink_to(ckpt.name)
    return folder / "checkpoints" / "best"


def test_a_target_outside_the_allowlist_is_refused_naming_the_key_and_how_to_allow_it(tmp_path, monkeypatch):
    best = hostile_checkpoint(tmp_path, tmp_path / "marker")
    monkeypatch.delenv(checkpoint.ALLOW_ENV, raising=False)
    with pytest.raises(SFTError, match=r"task\._target_='torch\.load'.*SFT_CLI_ALLOW_TARGETS=torch\.load"):
        checkpoint.load_config(best)
    monkeypatch.setenv(checkpoint.ALLOW_ENV, "my_pkg.*, torch.load")  # the user's explicit trust
    assert checkpoint.load_config(best).task._target_ == "torch.load"
    assert not (tmp_path / "marker").exists()  # reading the config instantiates nothing


def test_shipped_torch_and_allowed_prefix_targets_pass(monkeypatch):
    cfg = OmegaConf.create({"optimizer": {"_target_": "torch.optim.AdamW"},
                            "scheduler": {"_target_": "torch.optim.lr_scheduler.LambdaLR"},
                            "loss": {"_target_": "sft_cli.tasks.classification.loss.CrossEntropy",
                                     "extra": {"_target_": "sft_cli.training.l2sp.L2SP", "_partial_": True}},
                            "task": {"_target_": "my_pkg.tasks.Regression"}})
    with pytest.raises(SFTError, match=r"task\._target_='my_pkg\.tasks\.Regression'"):
        checkpoint.check_targets(cfg, Path("config.yaml"))
    monkeypatch.setenv(checkpoint.ALLOW_ENV, "my_pkg.*")
    checkpoint.check_targets(cfg, Path("config.yaml"))
    for hostile in ("subprocess.run", "torch.optim.lr_scheduler", "os.system", "builtins.eval"):
        with pytest.raises(SFTError):
            checkpoint.check_targets(OmegaConf.create({"x": {"_target_": hostile}}), Path("config.yaml"))


@pytest.mark.parametrize("command,args", [
    ("sft-eval", ["checkpoint=run/checkpoints/best"]),
    ("sft-predict", ["checkpoint=run/checkpoints/best", "text=great film"]),
    ("sft-export", ["checkpoint=run/checkpoints/best", "output=exported"]),
    ("sft-train", ["+experiment=text_classification", "dataset.train_file=train.tsv", "resume=run/checkpoints/best"]),
])
def test_every_command_that_loads_a_checkpoint_refuses_it_and_runs_nothing(tmp_path, command, args):
    hostile_checkpoint(tmp_path / "run", tmp_path / "marker")
    (tmp_path / "train.tsv").write_text("text\tlabel\ngood\tpos\nbad\tneg\n")
    result = run_cli(command, *args, cwd=tmp_path, env={checkpoint.ALLOW_ENV: ""})
    assert result.returncode == 1 and "Traceback" not in result.output, result.output[-2000:]
    assert "task._target_='torch.load'" in result.output and "SFT_CLI_ALLOW_TARGETS" in result.output
    assert not (tmp_path / "marker").exists() and not (tmp_path / "exported").exists()
