"""metrics.confusion, metrics.scores, the token window and the token loss on hand-made inputs."""

import math

import pytest
import torch
from torch import nn

from sft_cli.tasks.classification import metrics


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


def test_the_token_window_weights_the_loss_by_tokens_not_by_batches():
    from sft_cli.tasks.causal_lm.metrics import TokenWindow

    window = TokenWindow(torch.device("cpu"))
    window.add((torch.tensor(10.0), torch.tensor(10), torch.tensor(5), 2, torch.tensor(30)))  # mean 1.0 over 10
    window.add((torch.tensor(3.0), torch.tensor(1), torch.tensor(1), 1, torch.tensor(9)))     # mean 3.0 over 1
    read = window.read()
    assert read["loss"] == 13.0 / 11 and read["token_accuracy"] == 6 / 11  # not (1.0 + 3.0) / 2
    assert (read["samples"], read["tokens"], read["learned_tokens"]) == (3, 39, 11)
    assert abs(read["perplexity"] - math.exp(13.0 / 11)) < 1e-12


def test_token_cross_entropy_predicts_the_next_token_on_learned_positions_only():
    from sft_cli.tasks.causal_lm.loss import TokenCrossEntropy

    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, -100, 3, 5], [-100, 2, 6, -100]])
    summed, learned, correct = TokenCrossEntropy()(logits, labels)
    pairs = [(0, 1, 3), (0, 2, 5), (1, 0, 2), (1, 1, 6)]  # (row, position of the logits, the next token)
    expected = sum(torch.nn.functional.cross_entropy(logits[r, t][None], torch.tensor([y])) for r, t, y in pairs)
    assert learned == 4 and torch.allclose(summed, expected)
    assert correct == sum(int(logits[r, t].argmax() == y) for r, t, y in pairs)


def test_logits_at_the_learned_positions_alone_give_the_full_logits_loss_and_gradients(tmp_path):
    # a tiny Llama, long prompts and short answers, padding: the lm_head runs on 8 of 38 positions
    from fixtures import write_tiny_llama

    from sft_cli.models.hf import hf_causal_lm
    from sft_cli.tasks.causal_lm.loss import TokenCrossEntropy

    model = hf_causal_lm(str(write_tiny_llama(tmp_path / "llama")), dtype="float32")
    torch.manual_seed(0)
    ids = torch.randint(3, 200, (2, 20))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    inputs["attention_mask"][1, 16:] = 0  # row 1 is padded
    labels = torch.full_like(ids, -100)
    labels[0, 15:20], labels[1, 13:16] = ids[0, 15:20], ids[1, 13:16]
    results = []
    for learned_only in (False, True):
        model.zero_grad()
        logits = model(inputs, labels) if learned_only else (model(inputs), labels)
        if learned_only:
            assert logits[0].shape == (8, model.model.config.vocab_size)  # the 5 + 3 learned tokens
        summed, tokens, correct = TokenCrossEntropy()(*logits)
        summed.backward()
        results.append((summed.detach(), tokens, correct, [p.grad.clone() for p in model.parameters()]))
    (full, *full_counts, full_grads), (part, *part_counts, part_grads) = results
    assert torch.allclose(part, full, rtol=1e-6, atol=0) and part_counts == full_counts
    for a, b in zip(part_grads, full_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
