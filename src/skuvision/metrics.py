"""The torchmetrics every stage logs, and the full evaluation report eval.py writes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP


def eval_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The val/test loss: plain cross-entropy, whatever the training loss adds (label smoothing, class
    weights, soft targets), so runs with different recipes compare, and train.py and eval.py agree."""
    return F.cross_entropy(logits.float(), labels)


def classification_metrics(num_classes: int) -> MetricCollection:
    # Inputs come from the model and the data module, always well-formed: skip the per-update checks.
    options = {"num_classes": num_classes, "validate_args": False}
    metrics = {
        "acc": MulticlassAccuracy(average="micro", **options),
        "f1_macro": MulticlassF1Score(average="macro", **options),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(top_k=5, average="micro", **options)
    return MetricCollection(metrics)


def evaluation_report(logits: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> dict:
    """Accuracy, top-k, macro and weighted F1, per-class precision/recall/F1, one-vs-rest AUROC, the
    confusion matrix, all from torchmetrics, keyed as in training (`test/...`)."""
    k = len(class_names)
    logits, labels = logits.float(), labels.long()
    probs = logits.softmax(dim=1)
    report = {
        "test/loss": eval_loss(logits, labels).item(),
        "test/acc": MulticlassAccuracy(k, average="micro")(probs, labels).item(),
        "test/f1_macro": MulticlassF1Score(k, average="macro")(probs, labels).item(),
        "test/f1_weighted": MulticlassF1Score(k, average="weighted")(probs, labels).item(),
        "test/auroc_macro": MulticlassAUROC(k, average="macro")(probs, labels).item(),
        "test/num_images": len(labels),
    }
    if k >= 5:
        report["test/acc_top5"] = MulticlassAccuracy(k, top_k=5, average="micro")(probs, labels).item()
    per_class = {
        "precision": MulticlassPrecision(k, average=None)(probs, labels),
        "recall": MulticlassRecall(k, average=None)(probs, labels),
        "f1": MulticlassF1Score(k, average=None)(probs, labels),
        "auroc": MulticlassAUROC(k, average=None)(probs, labels),
    }
    report["per_class"] = {
        name: {metric: values[i].item() for metric, values in per_class.items()}
        | {"support": int((labels == i).sum())}
        for i, name in enumerate(class_names)
    }
    report["confusion_matrix"] = MulticlassConfusionMatrix(k)(probs, labels).tolist()
    return report


def retrieval_report(features: torch.Tensor, labels: torch.Tensor, num_queries: int, seed: int) -> dict:
    """Each of `num_queries` items (seeded sample) queries all the others by cosine similarity; an item of
    the same class is relevant. recall@k as image-retrieval benchmarks define it, the share of queries with a
    relevant item among the k nearest (torchmetrics' RetrievalHitRate), and mAP (RetrievalMAP)."""
    n = len(labels)
    generator = torch.Generator().manual_seed(seed)
    query = torch.randperm(n, generator=generator)[: min(num_queries, n)]
    sims = features[query] @ features.T
    relevant = labels[query][:, None] == labels[None, :]
    keep = torch.ones_like(relevant)
    keep[torch.arange(len(query)), query] = False  # an item does not retrieve itself
    indexes = torch.arange(len(query))[:, None].expand_as(sims)
    preds, target, indexes = sims[keep], relevant[keep], indexes[keep]
    report = {
        f"recall@{k}": RetrievalHitRate(top_k=k)(preds, target, indexes=indexes).item() for k in (1, 5, 10)
    }
    report["mAP"] = RetrievalMAP()(preds, target, indexes=indexes).item()
    report["queries"] = len(query)
    report["catalogue"] = n
    return report
