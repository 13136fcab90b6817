"""Classification metrics against values computed by hand (scikit-learn's conventions, without sklearn)."""

from __future__ import annotations

import pytest
import torch

from llmlab.evaluation.classification import classification_metrics, confusion_matrix, plot_confusion

# rows = true class, columns = predicted class
CM = [[5, 1, 0],
      [2, 3, 1],
      [0, 0, 4]]


def test_confusion_matrix_counts_pairs():
    targets = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    preds = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    expected = torch.tensor([[1, 1, 0],
                             [0, 2, 0],
                             [1, 0, 2]])
    assert torch.equal(confusion_matrix(preds, targets, 3), expected)
    # additive over batches: the matrix of a split is the sum of its batches'
    halves = confusion_matrix(preds[:3], targets[:3], 3) + confusion_matrix(preds[3:], targets[3:], 3)
    assert torch.equal(halves, expected)


def test_confusion_matrix_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    targets, preds = torch.randint(0, 5, (500,), generator=g), torch.randint(0, 5, (500,), generator=g)
    loop = torch.zeros(5, 5, dtype=torch.long)
    for t, p in zip(targets.tolist(), preds.tolist()):
        loop[t, p] += 1
    assert torch.equal(confusion_matrix(preds, targets, 5), loop)


def test_macro_f1_by_hand():
    m = classification_metrics(CM, ["a", "b", "c"])
    # F1 = 2 tp / (2 tp + fp + fn): a = 10/13, b = 6/10, c = 8/9
    assert m["accuracy"] == pytest.approx(12 / 16)
    assert m["macro_f1"] == pytest.approx((10 / 13 + 6 / 10 + 8 / 9) / 3)
    assert m["n"] == 16
    a = m["per_class"]["a"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(5 / 7), pytest.approx(5 / 6), 6)
    assert m["per_class"]["c"]["precision"] == pytest.approx(4 / 5) and m["per_class"]["c"]["recall"] == 1.0
    assert classification_metrics(torch.tensor(CM))["macro_f1"] == pytest.approx(m["macro_f1"])  # tensors too


def test_absent_and_never_predicted_classes():
    # class 2 neither true nor predicted: left out of the macro mean (sklearn without labels=)
    m = classification_metrics([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    f1_0, f1_1 = 6 / 7, 4 / 5
    assert m["macro_f1"] == pytest.approx((f1_0 + f1_1) / 2)
    # class 1 true but never predicted: precision 0/0 counts as 0, its F1 is 0 and is averaged in
    m = classification_metrics([[4, 0], [3, 0]])
    assert m["per_class"]["1"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 3}
    assert m["macro_f1"] == pytest.approx((8 / 11 + 0.0) / 2)
    assert classification_metrics([[0, 0], [0, 0]]) == {**classification_metrics([[0, 0], [0, 0]]),
                                                         "accuracy": 0.0, "macro_f1": 0.0, "n": 0}


def test_plot_is_a_png():
    png = plot_confusion(torch.tensor(CM), ["comedy", "history", "tragedy"], "test split")
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5_000
