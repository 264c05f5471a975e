"""LoRA adapters (adapter=lora, through peft) as a user runs them: a tiny BERT classifier, a tiny Llama on chats
and a ResNet-18, trained with adapters; checkpoints hold the adapter and the new head only, reload onto their
base, export merged or as a peft folder, and refuse a base that is missing or differs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from conftest import FAST, assert_kill_and_resume_is_bitwise, ok, read_json, run_cli
from fixtures import chat_rows, sentiment_rows, write_tiny_bert, write_tiny_llama
from inprocess import train_offline

from sft_cli.extras import install_command

pytest.importorskip("peft")


def lora_keys_only(weights: dict) -> bool:
    return all(".lora_" in k or ".modules_to_save." in k for k in weights)


def model_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------- a text classifier


@pytest.fixture(scope="module")
def text_lora(tmp_path_factory) -> Path:
    """The tiny BERT fine-tuned with adapter=lora adapter.r=4 on 600 TSV rows, validated on another file."""
    cwd = tmp_path_factory.mktemp("text_lora")
    write_tiny_bert(cwd / "tiny-bert")
    for name, n, seed in (("train.tsv", 600, 1), ("val.tsv", 80, 2)):
        (cwd / name).write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentiment_rows(n, seed=seed)))
    train_offline(["+experiment=text_classification", "dataset.train_file=train.tsv", "dataset.val_file=val.tsv",
                   f"model.name_or_path={cwd / 'tiny-bert'}", "adapter=lora", "adapter.r=4", "adapter.dropout=0.05",
                   "optimizer.lr=5e-3", "trainer.max_epochs=6", "trainer.batch_size=16", "trainer.progress_bar=false",
                   "report=false"], "run", cwd=cwd)
    return cwd


def test_a_lora_classifier_learns_and_its_checkpoint_holds_only_the_adapter_and_head(text_lora: Path):
    summary = read_json(text_lora / "run" / "summary.json")
    assert summary["best_value"] > 0.9, summary  # two classes: chance is 0.5
    # r=4 on 32-wide layers is a quarter of their rank; on BERT-base (768 wide) r=8 trains about 1% of it
    assert summary["trainable_params"] < summary["total_params"] / 4
    best = text_lora / "run" / "checkpoints" / "best"
    weights = load_file(best / "model.safetensors")
    assert lora_keys_only(weights) and any("classifier.modules_to_save" in k for k in weights)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights if ".lora_" in k} == \
        {"query", "key", "value", "dense"}  # every Linear layer of the encoder, not the head
    assert model_bytes(best) < model_bytes(text_lora / "tiny-bert") / 4
    base = read_json(best / "meta.json")["adapter_base"]
    assert base["source"] == str(text_lora / "tiny-bert") and len(base["fingerprint"]) == 16


def test_eval_after_reload_equals_the_metrics_at_save_time(text_lora: Path):
    ok(run_cli("sft-eval", "checkpoint=run/checkpoints/best", "split=val", "hydra.run.dir=ev", cwd=text_lora))
    saved = read_json(text_lora / "run" / "checkpoints" / "best" / "meta.json")["metrics"]
    report = read_json(text_lora / "ev" / "eval.json")
    assert report["accuracy"] == saved["val_accuracy"]
    assert report["loss"] == pytest.approx(saved["val_loss"], rel=1e-5)


def test_merged_and_adapter_exports_give_the_logits_of_base_plus_adapter(text_lora: Path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from sft_cli.training import checkpoint, restore

    ckpt = text_lora / "run" / "checkpoints" / "best"
    ok(run_cli("sft-export", f"checkpoint={ckpt}", "output=merged", cwd=text_lora))
    ok(run_cli("sft-export", f"checkpoint={ckpt}", "output=adapter", "merge=false", cwd=text_lora))
    tokenizer = AutoTokenizer.from_pretrained(text_lora / "merged")
    batch = dict(tokenizer(["great film", "awful book it was"], padding=True, return_tensors="pt"))
    _, ours = restore.load_model(checkpoint.load_config(ckpt), ckpt, torch.device("cpu"))
    merged = AutoModelForSequenceClassification.from_pretrained(text_lora / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(text_lora / "tiny-bert", num_labels=2)
    adapter = PeftModel.from_pretrained(base, text_lora / "adapter").eval()
    assert not list((text_lora / "merged").glob("adapter_*"))  # a plain transformers folder
    with torch.inference_mode():
        expected = ours(batch)
        torch.testing.assert_close(merged(**batch).logits, expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(adapter(**batch).logits, expected, atol=1e-5, rtol=1e-4)


def test_a_missing_or_different_base_model_is_a_clear_error(text_lora: Path):
    ckpt = "checkpoint=run/checkpoints/best"
    missing = run_cli("sft-eval", ckpt, "split=val", f"model.name_or_path={text_lora / 'gone'}", cwd=text_lora)
    assert missing.returncode != 0 and "Traceback" not in missing.output
    assert "needs its base model" in missing.output and "model.name_or_path" in missing.output

    write_tiny_bert(text_lora / "other-bert", seed=5)  # same architecture, other weights
    other = run_cli("sft-predict", ckpt, "text=great film", f"model.name_or_path={text_lora / 'other-bert'}",
                    cwd=text_lora)
    assert other.returncode != 0 and "Traceback" not in other.output
    assert "different weights" in other.output and str(text_lora / "tiny-bert") in other.output


# ---------------------------------------------------------------------------------------------- a causal LM


@pytest.fixture(scope="module")
def chat_lora(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("chat_lora")
    write_tiny_llama(cwd / "tiny-llama")
    for name, n, seed in (("train.jsonl", 160, 0), ("val.jsonl", 24, 1)):
        (cwd / name).write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed=seed)))
    train_offline(chat_args(cwd), "run", cwd=cwd)
    return cwd


def chat_args(cwd: Path) -> list[str]:
    return ["+experiment=chat_sft", "dataset.train_file=train.jsonl", "dataset.val_file=val.jsonl",
            f"model.name_or_path={cwd / 'tiny-llama'}", "adapter=lora", "adapter.r=8", "optimizer.lr=1e-2",
            "trainer.max_epochs=3",
            "trainer.batch_size=8", "trainer.progress_bar=false", "task.samples=2", "report=false"]


def test_a_lora_causal_lm_learns_and_exports_a_peft_folder_that_generates_the_same(chat_lora: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from sft_cli.training import checkpoint, restore

    rows = [json.loads(line) for line in (chat_lora / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in rows if r["split"] == "val"]
    # a random tiny Llama whose embeddings and lm_head stay frozen learns slowly, but it learns
    assert val == sorted(val, reverse=True) and val[-1] < val[0] - 0.05, val
    ckpt = chat_lora / "run" / "checkpoints" / "best"
    weights = load_file(ckpt / "model.safetensors")
    assert lora_keys_only(weights)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in weights} == \
        {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # every Linear but lm_head
    ok(run_cli("sft-export", f"checkpoint={ckpt}", "output=adapter", "merge=false", cwd=chat_lora))
    base = AutoModelForCausalLM.from_pretrained(chat_lora / "tiny-llama")
    adapter = PeftModel.from_pretrained(base, chat_lora / "adapter").eval()
    _, ours = restore.load_model(checkpoint.load_config(ckpt), ckpt, torch.device("cpu"))
    ids = torch.tensor([[1, 5, 9, 13, 2, 7]])
    with torch.inference_mode():
        torch.testing.assert_close(adapter(input_ids=ids).logits, ours({"input_ids": ids}), atol=1e-5, rtol=1e-4)
    answer = ok(run_cli("sft-predict", f"checkpoint={ckpt}", "prompt=hello", cwd=chat_lora))
    assert "hello" in answer.output


def test_a_kill_within_an_epoch_resumes_lora_training_bitwise(tmp_path: Path):
    write_tiny_llama(tmp_path / "tiny-llama")
    for name, n, seed in (("train.jsonl", 64, 0), ("val.jsonl", 8, 1)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in chat_rows(n, seed=seed)))
    args = [*chat_args(tmp_path), "trainer.max_epochs=2", "trainer.checkpoint_every_n_steps=3", "task.samples=0"]
    assert_kill_and_resume_is_bitwise(args, tmp_path)


@pytest.mark.parametrize("overrides, expected", [
    # resuming with another adapter, or none: the keys that differ, and resume=
    (["adapter.r=4", "resume=run"], ["run/checkpoints/last does not match the configured adapter: it was trained "
                                     "with adapter=lora adapter.r=8, and the config now has adapter.r=4",
                                     "continues (resume=)", "give adapter=lora adapter.r=8"]),
    (["adapter=none", "resume=run"], ["trained with adapter=lora adapter.r=8, and the config now has adapter=none"]),
    # values with which LoRA trains nothing
    (["adapter.alpha=0"], ["adapter.alpha=0 must be a number > 0", "alpha=0 changes nothing"]),
    (["freeze=head_only"], ["nothing trains in epoch 1: freeze=head_only leaves only stages", "Drop freeze=head_only"]),
])
def test_lora_mistakes_are_one_message_naming_the_keys(chat_lora: Path, overrides, expected):
    # in-process: the SFTError that sft-train prints, as the subprocess tests of the other mistakes show
    from sft_cli.errors import SFTError

    keys = [o.split("=")[0] for o in overrides]  # the run's own adapter=lora adapter.r=8 give way (adapter=none)
    args = [a for a in chat_args(chat_lora) if not a.startswith(tuple(keys))]
    with pytest.raises(SFTError) as error:
        train_offline([*args, *overrides], f"refused/{'_'.join(keys)}", cwd=chat_lora)
    assert all(text in str(error.value) for text in expected), str(error.value)


# ---------------------------------------------------------------------------------------------- torchvision


def test_lora_on_a_resnets_upper_blocks_trains_convolutions_and_exports_merged_weights(tmp_path: Path):
    from torchvision import models

    from sft_cli.training import checkpoint, restore

    torch.manual_seed(0)
    torch.save(models.resnet18(num_classes=1000).state_dict(), tmp_path / "resnet18-base.pth")  # the "pretrained" base
    train_offline([*FAST, f"model.weights={tmp_path / 'resnet18-base.pth'}", "adapter=lora",
                   "adapter.target_modules=[layer3,layer4]", "trainer.max_epochs=2"], "run", cwd=tmp_path)
    ckpt = tmp_path / "run" / "checkpoints" / "best"
    weights = load_file(ckpt / "model.safetensors")
    adapted = {k.split(".lora_")[0] for k in weights if ".lora_" in k}
    assert adapted and all(k.startswith(("layer3.", "layer4.")) for k in adapted)
    assert any(k.endswith("conv1") for k in adapted)  # convolutions, not only Linear layers
    assert any(k.startswith("fc.modules_to_save") for k in weights)  # the new head trains in full
    assert (ckpt / "model.safetensors").stat().st_size < (tmp_path / "resnet18-base.pth").stat().st_size / 4

    ok(run_cli("sft-eval", f"checkpoint={ckpt}", "split=val", "hydra.run.dir=ev", cwd=tmp_path))
    saved = read_json(ckpt / "meta.json")["metrics"]
    assert read_json(tmp_path / "ev" / "eval.json")["accuracy"] == saved["val_accuracy"]

    ok(run_cli("sft-export", f"checkpoint={ckpt}", "output=merged", cwd=tmp_path))
    plain = models.resnet18(num_classes=10)
    plain.load_state_dict(load_file(tmp_path / "merged" / "model.safetensors"))
    cfg = checkpoint.load_config(ckpt)
    _, ours = restore.load_model(cfg, ckpt, torch.device("cpu"))
    images = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(plain.eval()(images), ours(images), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- in process


def tiny_classifier(tmp_path: Path):
    from sft_cli.models import hf

    write_tiny_bert(tmp_path / "tiny-bert")
    return hf.hf_classifier(str(tmp_path / "tiny-bert"), ["neg", "pos"])


def lora(**overrides):
    from sft_cli.models import adapters

    return adapters.LoRA(**{"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": None, "bias": "none",
                            "modules_to_save": [], **overrides})


def test_only_adapter_and_head_parameters_change_when_the_optimizer_steps(tmp_path: Path):
    from sft_cli.models import adapters, freeze
    from sft_cli.models.stages import head_name
    from sft_cli.training import optim

    model = adapters.apply(tiny_classifier(tmp_path), lora())
    freeze.apply(model, model.sft.stages, [])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt_cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "lr": 1e-2, "weight_decay": 0.01})
    optimizer = optim.build_optimizer(opt_cfg, OmegaConf.create({"head_lr": None, "layer_decay": None}), model,
                                      head_name(model))
    inputs = dict(model.tokenizer(["good film", "bad book"], padding=True, return_tensors="pt"))
    for _ in range(3):
        torch.nn.functional.cross_entropy(model(inputs), torch.tensor([1, 0])).backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= model.sft.trainable
    assert all(".lora_" in n or ".modules_to_save." in n for n in model.sft.trainable)
    assert any(".lora_B." in n for n in changed) and any("classifier.modules_to_save" in n for n in changed)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for n, p in model.named_parameters() if n in model.sft.trainable}


def test_freeze_policies_still_decide_which_stages_adapters_train_in(tmp_path: Path):
    from sft_cli.models import adapters, freeze

    model = adapters.apply(tiny_classifier(tmp_path), lora())
    frozen = [name for name, _ in model.sft.stages if name not in model.sft.new_stages][:2]  # the embeddings, layer 0
    freeze.apply(model, model.sft.stages, frozen)
    trains = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any(".layer.0." in n for n in trains) and any(".layer.1." in n and ".lora_" in n for n in trains)


def test_target_modules_that_match_nothing_and_a_missing_peft_are_config_errors(tmp_path: Path, monkeypatch):
    from sft_cli import checks
    from sft_cli.errors import SFTError
    from sft_cli.models import adapters

    with pytest.raises(SFTError, match=r"adapter.target_modules names \['q_proj'\].*query"):
        adapters.apply(tiny_classifier(tmp_path), lora(target_modules=["q_proj"]))

    cfg = OmegaConf.create({"adapter": {"r": 8}, "model": {"weights": "pretrained"}})
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name: None if name == "peft" else real(name))
    assert any(install_command("peft") in p for p in checks._adapter_problems(cfg))
    cfg.model.weights = None
    assert any("randomly initialised base" in p for p in checks._adapter_problems(cfg))


def test_the_fingerprint_sees_a_changed_weights_file(tmp_path: Path):
    from sft_cli.models.adapters import fingerprint

    file = tmp_path / "model.safetensors"
    file.write_bytes(bytes(range(256)) * 40_000)
    before = fingerprint([file])
    copy = tmp_path / "copy" / "model.safetensors"
    copy.parent.mkdir()
    shutil.copy(file, copy)
    assert fingerprint([copy]) == before  # where the base lives does not matter, what it holds does
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 1  # one bit in the middle of the first chunk after the half-way point
    file.write_bytes(bytes(data))
    assert fingerprint([file]) != before


def test_the_fingerprint_hashes_a_file_under_2_gib_whole_and_samples_larger_ones(tmp_path: Path):
    from sft_cli.models.adapters import fingerprint

    file = tmp_path / "model.safetensors"
    file.write_bytes(bytes(range(256)) * 40_000)  # 10 MB: 32 slices of 64 KiB, 312 KiB apart
    whole, sampled = fingerprint([file]), fingerprint([file], whole_up_to=1 << 20)
    data = bytearray(file.read_bytes())
    data[len(data) // 2 + 100_000] ^= 1  # between two slices
    file.write_bytes(bytes(data))
    assert fingerprint([file]) != whole
    assert fingerprint([file], whole_up_to=1 << 20) == sampled  # what a file over the limit cannot promise


def test_convolution_models_adapt_what_peft_can_and_keep_batchnorm_statistics():
    from torch.nn.modules.batchnorm import _BatchNorm

    from sft_cli.errors import SFTError
    from sft_cli.models import adapters, freeze, vision

    mobile = vision.torchvision_classifier("mobilenet_v3_small", ["a", "b"])
    adapters.apply(mobile, lora(bias="all"))  # depthwise convolutions are left out, not a peft error
    adapted = [n for n, m in mobile.named_modules() if hasattr(m, "lora_A")]
    assert adapted and all(mobile.get_submodule(n).base_layer.groups == 1 for n in adapted if "features" in n)
    freeze.apply(mobile, mobile.sft.stages, [])  # biases train (bias=all), yet no BatchNorm statistic moves
    assert all(not m.training for n, m in mobile.named_modules() if isinstance(m, _BatchNorm))

    # a new stem trains in full beside the adapter, although peft cannot tell its conv1 from every block's
    cifar = adapters.apply(vision.torchvision_classifier("resnet18", ["a", "b"], small_input_stem=True), lora())
    assert {"conv1.weight", "bn1.weight"} <= cifar.sft.trainable and "layer1.0.conv1.weight" not in cifar.sft.trainable
    assert "bn1.running_mean" in adapters.adapter_weights(cifar)  # the new BatchNorm's statistics are saved
    freeze.apply(cifar, cifar.sft.stages, [])
    assert cifar.bn1.training and not cifar.layer1[0].bn1.training
    with pytest.raises(SFTError, match=r"adapter.modules_to_save names 'classifier', which matches no module"):
        adapters.apply(vision.torchvision_classifier("resnet18", ["a", "b"]), lora(modules_to_save="classifier"))
