"""metrics.confusion and metrics.scores on hand-made inputs."""

import pytest
import torch
from torch import nn

from sft_cli import metrics


def one_hot_logits(predictions, num_classes):
    return nn.functional.one_hot(torch.tensor(predictions), num_classes).float()


def test_confusion_counts_true_class_by_row_and_prediction_by_column():
    cm = metrics.confusion(one_hot_logits([0, 0, 1, 1, 2, 2, 3], 5), torch.tensor([0, 0, 0, 1, 1, 2, 2]), 5)
    assert cm.tolist() == [[2, 1, 0, 0, 0],
                           [0, 1, 1, 0, 0],
                           [0, 0, 1, 1, 0],
                           [0, 0, 0, 0, 0],
                           [0, 0, 0, 0, 0]]


def test_scores_on_a_hand_made_example():
    # class 3 is predicted but never true (F1 0, counted); class 4 is absent from both (left out of macro-F1)
    cm = metrics.confusion(one_hot_logits([0, 0, 1, 1, 2, 2, 3], 5), torch.tensor([0, 0, 0, 1, 1, 2, 2]), 5)
    s = metrics.scores(cm)
    assert s["accuracy"] == pytest.approx(4 / 7)
    assert s["precision"] == pytest.approx([1.0, 0.5, 0.5, 0.0, 0.0])
    assert s["recall"] == pytest.approx([2 / 3, 0.5, 0.5, 0.0, 0.0])
    assert s["f1"] == pytest.approx([0.8, 0.5, 0.5, 0.0, 0.0])
    assert s["support"] == [3, 2, 2, 0, 0]
    assert s["macro_f1"] == pytest.approx((0.8 + 0.5 + 0.5 + 0.0) / 4)


def test_macro_f1_matches_scikit_learn_over_the_classes_that_occur():
    from sklearn.metrics import f1_score

    g = torch.Generator().manual_seed(0)
    targets = torch.randint(0, 6, (200,), generator=g)  # class 6 and 7 never occur
    predictions = torch.where(torch.rand(200, generator=g) < 0.6, targets, torch.randint(0, 6, (200,), generator=g))
    s = metrics.scores(metrics.confusion(one_hot_logits(predictions.tolist(), 8), targets, 8))
    present = sorted(set(targets.tolist()) | set(predictions.tolist()))
    assert s["macro_f1"] == pytest.approx(f1_score(targets, predictions, labels=present, average="macro"))
    assert s["accuracy"] == pytest.approx((targets == predictions).float().mean().item())


def test_scores_of_an_empty_confusion_matrix_are_zero():
    s = metrics.scores(torch.zeros(3, 3, dtype=torch.long))
    assert (s["accuracy"], s["macro_f1"], s["support"]) == (0.0, 0.0, [0, 0, 0])
