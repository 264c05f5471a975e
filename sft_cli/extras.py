"""The command that installs an optional extra (peft, tensorboard, ...). PyPI's `sft-cli` is another project,
so asking pip for this project by name would install a stranger's package: a checkout is named by its folder
(pip install -e "<checkout>[peft]"), an installed wheel by the extra's own requirements."""

from importlib import metadata
from pathlib import Path

DISTRIBUTION = "sft-cli"  # the name in pyproject.toml; not on PyPI


def install_command(extra: str) -> str:
    """`pip install -e "/path/to/checkout[extra]"` in a checkout, else `pip install "req" ...` of the extra."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file():
        return f'pip install -e "{root}[{extra}]"'
    try:
        requires = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        requires = []
    wanted = [r.split(";")[0].strip() for r in requires
              if r.split(";")[-1].replace('"', "'").replace(" ", "").endswith(f"extra=='{extra}'")]
    return "pip install " + " ".join(f'"{r}"' for r in wanted) if wanted else f"install the {extra} extra"
