"""Class weights and the L2-SP penalty (sft_cli/loss.py)."""

from collections import OrderedDict
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

from sft_cli.errors import SFTError
from sft_cli.models import vision
from sft_cli.models.parts import Parts
from sft_cli.tasks.classification import loss
from sft_cli.training import l2sp


def test_balanced_class_weights_are_n_over_classes_times_count():
    targets = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2]
    w = loss.resolve_class_weights("balanced", targets, 3)
    assert w.tolist() == pytest.approx([12 / (3 * 6), 12 / (3 * 2), 12 / (3 * 4)])
    from sklearn.utils.class_weight import compute_class_weight

    assert w.tolist() == pytest.approx(compute_class_weight("balanced", classes=np.arange(3), y=targets).tolist())


def test_class_weights_null_and_explicit_list():
    assert loss.resolve_class_weights(None, [0, 1], 2) is None
    assert loss.resolve_class_weights([1, 2.5, 3], [0, 1, 2], 3).tolist() == [1.0, 2.5, 3.0]


@pytest.mark.parametrize("spec", [[1.0, 2.0], [1, 2, 3, 4], "inverse"])
def test_bad_class_weights_are_an_error_naming_the_key(spec):
    with pytest.raises(SFTError, match="loss.class_weights"):
        loss.resolve_class_weights(spec, [0, 1, 2], 3)


def test_balanced_class_weights_with_an_empty_class_is_an_error():
    with pytest.raises(SFTError, match=r"loss.class_weights=balanced.*\[1\]"):
        loss.resolve_class_weights("balanced", [0, 0, 2], 3)


def tiny_model():
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(body=nn.Linear(4, 3), act=nn.ReLU(), fc=nn.Linear(3, 2)))


def test_l2sp_is_zero_at_start_grows_when_the_backbone_moves_and_ignores_the_head():
    model = tiny_model()
    model.sft = Parts([("body", ["body"]), ("fc", ["fc"])], new_stages=["fc"])
    penalty = l2sp.L2SP(model, weight=0.5)
    assert float(penalty().detach()) == 0.0
    with torch.no_grad():
        model.fc.weight.add_(1.0)
        model.fc.bias.add_(1.0)
    assert float(penalty().detach()) == 0.0  # the head is free
    with torch.no_grad():
        model.body.weight.add_(0.1)
    value = penalty()
    assert float(value.detach()) == pytest.approx(0.5 * 12 * 0.1 ** 2)
    value.backward()  # differentiable: pulls the backbone back towards its start
    assert torch.allclose(model.body.weight.grad, torch.full((3, 4), 0.5 * 2 * 0.1))
    assert model.fc.weight.grad is None


def test_l2sp_does_not_anchor_a_new_small_input_stem_to_its_random_start():
    model = vision.torchvision_classifier("resnet18", list("0123456789"), None, True, ["conv1", "bn1"], [])
    anchored = {id(p) for p, _ in l2sp.L2SP(model, weight=1.0).anchors}
    names = {n for n, p in model.named_parameters() if id(p) in anchored}
    assert not any(n.startswith(("conv1.", "bn1.", "fc.")) for n in names)
    assert {n for n, _ in model.named_parameters() if n.startswith("layer")} <= names


def test_l2sp_pulls_the_same_parameters_through_a_wrapper_such_as_ddp():
    model = tiny_model()
    model.sft = Parts([("body", ["body"]), ("fc", ["fc"])], new_stages=["fc"])
    criterion = loss.CrossEntropy(label_smoothing=0.0, class_weights=None, extra=partial(l2sp.L2SP, weight=0.5),
                                  train_targets=[0, 1], num_classes=2, model=model)
    wrapped = nn.Sequential(OrderedDict(module=model))  # parameter names gain a prefix, as under DDP
    with torch.no_grad():
        wrapped.module.body.weight.add_(0.1)
    assert float(criterion.extra().detach()) == pytest.approx(0.5 * 12 * 0.1 ** 2)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_with_balanced_weights_is_a_weighted_sum_that_its_weight_turns_into_torchs_mean(smoothing):
    model = tiny_model()
    criterion = loss.CrossEntropy(label_smoothing=smoothing, class_weights="balanced", extra=None,
                                  train_targets=[0, 0, 0, 1], num_classes=2, model=model)
    logits, targets = torch.randn(3, 2), torch.tensor([0, 1, 1])
    weights = torch.tensor([4 / 6, 4 / 2])
    assert float(criterion.batch_weight(targets)) == pytest.approx(float(weights[targets].sum()))
    expected = nn.functional.cross_entropy(logits, targets, weight=weights, label_smoothing=smoothing)
    assert float(criterion(logits, targets) / criterion.batch_weight(targets)) == pytest.approx(float(expected))
