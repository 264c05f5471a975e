"""The transformers classifier builder: stages for freezing, new layers, layer-wise lr decay, errors."""

import pytest

from sft_cli.errors import SFTError
from sft_cli.models import hf, stages
from sft_cli.training import optim

from fixtures import write_tiny_bert


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return write_tiny_bert(tmp_path_factory.mktemp("bert"))


def test_stages_are_embeddings_each_layer_pooler_and_head(tiny_bert):
    model = hf.hf_classifier(str(tiny_bert), ["neg", "pos"])
    assert [name for name, _ in model.sft.stages] == [
        "stem", "model.bert.encoder.layer.0", "model.bert.encoder.layer.1", "model.bert.encoder.layer.2",
        "model.bert.pooler", "model.classifier"]
    assert model.sft.stages[0][1] == ["model.bert.embeddings"]
    assert model.sft.new_stages == ["model.classifier"]  # loaded from the checkpoint: everything but the head
    assert stages.head_name(model) == "model.classifier"
    assert model.model.config.id2label == {0: "neg", 1: "pos"}


def test_layer_wise_lr_decay_shrinks_the_lr_one_factor_per_stage_below_the_top(tiny_bert):
    model = hf.hf_classifier(str(tiny_bert), ["neg", "pos"])
    groups = optim.param_groups(model, "model.classifier", lr=1.0, weight_decay=0.01, head_lr=None, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    # the head and the pooler (everything above the last encoder layer) are the top: lr x 0.5**0
    expected = {"model.classifier": 1.0, "model.bert.pooler": 1.0, "model.bert.encoder.layer.2": 0.5,
                "model.bert.encoder.layer.0": 0.125, "model.bert.embeddings": 0.0625}
    for name, p in model.named_parameters():
        prefix = next((k for k in expected if name.startswith(k + ".")), None)
        if prefix:
            assert lr_of[id(p)] == expected[prefix], name
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_a_model_that_cannot_be_found_names_the_key(tmp_path):
    with pytest.raises(SFTError, match=r"model.name_or_path=.*no-such-model.*save_pretrained"):
        hf.hf_classifier(str(tmp_path / "no-such-model"), ["a", "b"])


def test_a_causal_lm_s_weights_follow_trainer_precision_only_on_a_gpu_with_native_bf16(monkeypatch):
    import torch

    from sft_cli.models.hf import weight_dtype

    assert weight_dtype("auto", "auto", "cpu") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert weight_dtype("auto", "auto", "auto") == weight_dtype("auto", "bf16-mixed", "cuda:0") == torch.bfloat16
    assert weight_dtype("auto", "16-mixed", "cuda") == weight_dtype("auto", "32", "cuda") == torch.float32
    assert weight_dtype("auto", "auto", "cpu") == torch.float32  # trainer.device=cpu on a GPU machine
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert weight_dtype("auto", "auto", "cuda") == torch.float32  # an older GPU
    assert weight_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(SFTError, match="model.dtype='half' is not one of: auto, float32"):
        weight_dtype("half")


def test_an_incomplete_weights_file_is_named_as_such(tmp_path):
    write_tiny_bert(tmp_path / "bert")
    weights = tmp_path / "bert" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a cut download
    with pytest.raises(SFTError, match=rf"its weights \({weights}\) are incomplete or corrupt.*download or copy"):
        hf.hf_classifier(str(tmp_path / "bert"), ["a", "b"])
