"""Classification metrics from a confusion matrix: accuracy, per-class precision / recall / F1,
macro-F1 (the unweighted mean of the per-class F1, Sokolova & Lapalme 2009, "A systematic analysis
of performance measures for classification tasks", Table 3), and a PNG of the matrix.

A confusion matrix ``C`` is ``(K, K)`` with ``C[i, j]`` = examples of true class ``i`` predicted as
``j``; it is additive over batches and over data-parallel ranks, so a split's metrics come from one
matrix summed over the whole split. Conventions are scikit-learn's (``f1_score(average="macro")``
without ``labels=``): a class that is neither in the truth nor in the predictions is left out of
the macro average (its F1 is undefined); an undefined precision or recall (nothing predicted /
nothing true) counts as 0.

No Lightning or Hydra; torch for the matrix (it is built on the model's device), numpy for the rest.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from llmlab.errors import UserError
from llmlab.utils import png_bytes

__all__ = ["classification_metrics", "confusion_matrix", "plot_confusion"]


def confusion_matrix(preds: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(K, K)`` int64 counts, rows = true class, columns = predicted class."""
    preds, targets = preds.reshape(-1).long(), targets.reshape(-1).long()
    if preds.shape != targets.shape:
        raise ValueError(f"preds {tuple(preds.shape)} and targets {tuple(targets.shape)} differ in size")
    k = int(num_classes)
    flat = torch.bincount(targets * k + preds, minlength=k * k)  # one bin per (true, predicted) pair
    return flat[: k * k].reshape(k, k)


def classification_metrics(cm, labels: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1 and per-class precision / recall / F1 / support of a confusion matrix.

    Returns ``{"accuracy", "macro_f1", "n", "per_class": {label: {precision, recall, f1, support}}}``.
    """
    cm = np.asarray(cm.detach().cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    k = cm.shape[0]
    labels = [str(i) for i in range(k)] if labels is None else [str(x) for x in labels]
    tp = np.diag(cm)
    support = cm.sum(axis=1)  # true examples per class
    predicted = cm.sum(axis=0)  # predictions per class
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros(k), where=support > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    present = (support > 0) | (predicted > 0)
    n = cm.sum()
    return {
        "accuracy": float(tp.sum() / n) if n else 0.0,
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
        "n": int(n),
        "per_class": {
            label: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                    "support": int(support[i])}
            for i, label in enumerate(labels)
        },
    }


def plot_confusion(cm, labels: Sequence[str], title: str = "confusion matrix") -> bytes:
    """PNG bytes: the matrix with counts, each row shaded by its share (recall on the diagonal).

    Drawn on a private Agg canvas, so matplotlib's global backend is left alone.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cm = np.asarray(cm.detach().cpu() if isinstance(cm, torch.Tensor) else cm, dtype=np.int64)
    labels = [str(x) for x in labels]
    if cm.shape != (len(labels), len(labels)):
        raise UserError(f"confusion matrix of shape {cm.shape} does not fit {len(labels)} labels")
    rows = cm.sum(axis=1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)  # row-normalised: big classes do not dominate
    size = 2.5 + 0.6 * len(labels)
    fig = Figure(figsize=(size + 1, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(len(labels))
    ax.set_xticks(ticks, labels, rotation=45, ha="right")
    ax.set_yticks(ticks, labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    metrics = classification_metrics(cm, labels)
    ax.set_title(f"{title}\naccuracy {metrics['accuracy']:.3f}, macro-F1 {metrics['macro_f1']:.3f}, n={metrics['n']}")
    fig.tight_layout()
    return png_bytes(fig, dpi=120)
