"""Freeze policies and stages (sft_cli.models.freeze) on real torchvision backbones, built with weights=None."""

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from sft_cli.errors import SFTError
from sft_cli.models import freeze, vision
from sft_cli.models.stages import head_name
from sft_cli.training import optim

RESNET_STAGES = ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]


def resnet18():
    torch.manual_seed(0)
    return vision.torchvision_classifier("resnet18", classes=list("abcde"), weights=None, stem=["conv1", "bn1"], expand=[])


@pytest.fixture(scope="module")
def vit():
    return vision.torchvision_classifier("vit_b_16", classes=list("abcde"), weights=None,
                                         stem=["class_token", "conv_proj", "encoder.pos_embedding"],
                                         expand=["encoder", "encoder.layers", "heads"])


def stage_of(stages, param_name: str) -> str:
    """The stage whose member is a prefix of `param_name` (or the parameter itself)."""
    hits = [name for name, members in stages
            if any(param_name == m or param_name.startswith(m + ".") for m in members)]
    assert len(hits) == 1, (param_name, hits)
    return hits[0]


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def sgd_step(model, head):
    """One SGD step (weight decay and momentum on, as the sgd config) on random 32x32 images."""
    opt = torch.optim.SGD(optim.param_groups(model, head, 0.1, 1e-3, None), lr=0.1, momentum=0.9)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def test_resnet18_stages_are_stem_layers_and_head():
    model = resnet18()
    assert model.sft.stages == [("stem", ["conv1", "bn1"]), ("layer1", ["layer1"]), ("layer2", ["layer2"]),
                                ("layer3", ["layer3"]), ("layer4", ["layer4"]), ("fc", ["fc"])]
    assert head_name(model) == "fc"


def test_unknown_stem_name_is_an_error_naming_model_stem():
    with pytest.raises(SFTError, match="model.stem"):
        vision.torchvision_classifier("resnet18", classes=list("abcde"), weights=None, stem=["conv9"], expand=[])


def test_head_only_trains_fc_alone_and_puts_other_batchnorms_in_eval():
    model = resnet18()
    stages = model.sft.stages
    frozen = freeze.HeadOnly().frozen(stages, "fc", 0)
    assert frozen == RESNET_STAGES[:-1]
    freeze.apply(model, stages, frozen)
    assert model.training
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"fc.weight", "fc.bias"}
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, _BatchNorm)]
    assert bns and all(not m.training for n, m in bns if not n.startswith("fc"))


def test_head_only_training_step_leaves_frozen_weights_and_bn_statistics_bitwise_unchanged():
    model = resnet18()
    stages = model.sft.stages
    freeze.apply(model, stages, freeze.HeadOnly().frozen(stages, "fc", 0))
    before = snapshot(model)
    sgd_step(model, "fc")
    after = model.state_dict()
    bn_buffers = [k for k in before if k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert len(bn_buffers) == 20 * 3  # resnet18 has 20 BatchNorm layers
    for k in before:
        if k.startswith("fc."):
            assert not torch.equal(before[k], after[k]), f"head {k} did not train"
        else:
            assert torch.equal(before[k], after[k]), f"frozen {k} changed"


def test_lower_n2_step_updates_only_unfrozen_stages_and_their_bn_statistics():
    model = resnet18()
    stages = model.sft.stages
    frozen = freeze.Lower(n=2).frozen(stages, "fc", 0)
    freeze.apply(model, stages, frozen)
    before = snapshot(model)
    sgd_step(model, "fc")
    after = model.state_dict()
    for stage in RESNET_STAGES:
        keys = [k for k in before if stage_of(stages, k) == stage]
        changed = [k for k in keys if not torch.equal(before[k], after[k])]
        if stage in frozen:
            assert changed == [], stage
        else:  # every weight, bias and BN statistic of a trainable stage moves
            assert sorted(changed) == sorted(keys), stage


def test_apply_with_nothing_frozen_restores_trainability_and_bn_train_mode():
    model = resnet18()
    stages = model.sft.stages
    freeze.apply(model, stages, freeze.HeadOnly().frozen(stages, "fc", 0))
    freeze.apply(model, stages, freeze.NoFreeze().frozen(stages, "fc", 1))
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


def test_lower_n_freezes_stem_plus_n_blocks():
    stages = resnet18().sft.stages
    assert freeze.Lower(n=2).frozen(stages, "fc", 0) == ["stem", "layer1", "layer2"]
    assert freeze.Lower(n=0).frozen(stages, "fc", 0) == ["stem"]
    assert freeze.Lower(n=4).frozen(stages, "fc", 0) == ["stem", "layer1", "layer2", "layer3", "layer4"]


def test_lower_until_freezes_up_to_and_including_the_named_stage():
    stages = resnet18().sft.stages
    assert freeze.Lower(until="layer3").frozen(stages, "fc", 0) == ["stem", "layer1", "layer2", "layer3"]
    assert freeze.Lower(n=0, until="layer1").frozen(stages, "fc", 0) == ["stem", "layer1"]  # until wins over n


@pytest.mark.parametrize("until", ["layer9", "fc", "conv1"])
def test_lower_bad_until_is_an_error_naming_freeze_until(until):
    stages = resnet18().sft.stages
    with pytest.raises(SFTError, match="freeze.until") as e:
        freeze.Lower(until=until).frozen(stages, "fc", 0)
    assert "layer3" in str(e.value)  # lists the valid choices


@pytest.mark.parametrize("n", [-1, 5, 100])
def test_lower_out_of_range_n_is_an_error_naming_freeze_n(n):
    stages = resnet18().sft.stages
    with pytest.raises(SFTError, match=r"freeze\.n"):
        freeze.Lower(n=n).frozen(stages, "fc", 0)


def test_gradual_unfreezes_one_stage_from_the_top_every_n_epochs():
    stages = resnet18().sft.stages
    policy = freeze.Gradual(every_n_epochs=2)
    got = [policy.frozen(stages, "fc", epoch) for epoch in range(13)]
    all5 = ["stem", "layer1", "layer2", "layer3", "layer4"]
    expected = [all5] * 2 + [all5[:4]] * 2 + [all5[:3]] * 2 + [all5[:2]] * 2 + [all5[:1]] * 2 + [[]] * 3
    assert got == expected


def test_gradual_rejects_every_n_epochs_below_one():
    with pytest.raises(SFTError, match="freeze.every_n_epochs"):
        freeze.Gradual(every_n_epochs=0)


def test_mobilenet_v3_small_stages_expand_features_and_classifier():
    model = vision.torchvision_classifier("mobilenet_v3_small", classes=list("abcde"), weights=None,
                                          stem=["features.0"], expand=["features", "classifier"])
    names = [name for name, _ in model.sft.stages]
    assert names == ["stem"] + [f"features.{i}" for i in range(1, 13)] + ["classifier.0", "classifier.3"]
    assert model.sft.stages[0] == ("stem", ["features.0"])
    head = head_name(model)
    assert head == "classifier.3"
    assert freeze.HeadOnly().frozen(model.sft.stages, head, 0) == names[:-1]
    counts = freeze.parameter_counts(model, model.sft.stages)
    assert sum(total for _, _, total in counts) == sum(p.numel() for p in model.parameters())


def test_vit_b_16_stages_hold_every_parameter_exactly_once(vit):
    stages = vit.sft.stages
    names = [name for name, _ in stages]
    assert names[0] == "stem"
    assert stages[0][1] == ["class_token", "conv_proj", "encoder.pos_embedding"]
    assert names[1:13] == [f"encoder.layers.encoder_layer_{i}" for i in range(12)]
    assert sum("encoder_layer" in n for n in names) == 12
    assert names[-2:] == ["encoder.ln", "heads.head"]
    assert head_name(vit) == "heads.head"
    # every parameter belongs to exactly one stage
    for name, _ in vit.named_parameters():
        stage_of(stages, name)
    counts = freeze.parameter_counts(vit, stages)
    assert [c[0] for c in counts] == names
    assert sum(total for _, _, total in counts) == sum(p.numel() for p in vit.parameters())
    assert all(trainable == total for _, trainable, total in counts)


def test_vit_head_only_freezes_direct_parameters_of_the_stem(vit):
    stages = vit.sft.stages
    frozen = freeze.HeadOnly().frozen(stages, "heads.head", 0)
    assert "heads.head" not in frozen and len(frozen) == len(stages) - 1
    freeze.apply(vit, stages, frozen)
    try:
        assert not vit.class_token.requires_grad and not vit.encoder.pos_embedding.requires_grad
        assert {n for n, p in vit.named_parameters() if p.requires_grad} == {"heads.head.weight", "heads.head.bias"}
        counts = dict((s, (t, n)) for s, t, n in freeze.parameter_counts(vit, stages))
        assert counts["heads.head"] == (768 * 5 + 5, 768 * 5 + 5)
        assert counts["stem"][0] == 0 and counts["stem"][1] == 768 + 768 * 3 * 16 * 16 + 768 + 197 * 768
    finally:
        freeze.apply(vit, stages, [])


def test_nothing_to_train_names_the_freeze_option_as_typed_not_its_class():
    from omegaconf import OmegaConf
    from torch import nn

    from sft_cli import train
    from sft_cli.errors import SFTError

    model = nn.Linear(2, 2).requires_grad_(False)
    cfg = OmegaConf.create({"freeze": {"_target_": "sft_cli.models.freeze.HeadOnly"}})
    with pytest.raises(SFTError, match=r"nothing trains in epoch 1: freeze=head_only leaves"):
        train._check_something_trains(model, 0, cfg)
