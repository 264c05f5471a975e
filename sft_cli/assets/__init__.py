"""Data files shipped inside the package (the chat quickstart's conversations), found wherever it is installed.

A YAML names one as `${sft_asset:chat_quickstart/train.jsonl}` (the resolver in config.py).
"""

from pathlib import Path

from sft_cli.errors import SFTError

ROOT = Path(__file__).resolve().parent


def path(name: str) -> str:
    """The absolute path of the shipped file `name` (relative to sft_cli/assets/)."""
    found = ROOT / name
    if not found.is_file() or ROOT not in found.resolve().parents:
        shipped = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*")
                         if p.is_file() and p.suffix not in (".py", ".pyc"))
        raise SFTError(f"${{sft_asset:{name}}}: sft-cli ships no such file; it ships: {', '.join(shipped)}")
    return str(found)
