"""Every install command the project prints or documents installs this project: PyPI's `sft-cli` is another
project, so `pip install "sft-cli[extra]"` would install a stranger's package."""

import re
import subprocess
from pathlib import Path

from sft_cli.extras import install_command

ROOT = Path(__file__).resolve().parents[1]
PYPI_FORM = re.compile(r"""pip install\s+(--upgrade\s+|-U\s+)?["']?sft-cli(\[|["'\s]|$)""", re.M)


def tracked_files() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / name for name in out.splitlines() if Path(name).suffix in (".py", ".md", ".yaml", ".toml", "")]


def test_no_file_tells_users_to_install_sft_cli_from_pypi():
    found = []
    for path in tracked_files():
        if path.is_file() and path != Path(__file__).resolve():
            text = path.read_text(encoding="utf-8", errors="replace")
            found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in PYPI_FORM.finditer(text)]
            found += [f"{path.relative_to(ROOT)}: sft-cli[" for _ in re.finditer(r"sft-cli\\?\[", text)]  # or a regex
    assert found == []


def test_messages_name_this_checkout_with_the_extra():
    assert install_command("peft") == f'pip install -e "{ROOT}[peft]"'
