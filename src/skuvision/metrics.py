"""The torchmetrics every stage logs, and the full evaluation report eval.py writes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMAP

from skuvision.compat import store_probabilities


def eval_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The val/test loss: plain cross-entropy, whatever the training loss adds (label smoothing, class
    weights, soft targets), so runs with different recipes compare, and train.py and eval.py agree."""
    return F.cross_entropy(logits.float(), labels)


def classification_metrics(num_classes: int, ignore_index: int | None = None) -> MetricCollection:
    """acc, f1_macro (and acc_top5 from 5 classes); `ignore_index`: the target of rows without a label,
    left out of every figure."""
    # Inputs come from the model and the data module, always well-formed: skip the per-update checks.
    options = {"num_classes": num_classes, "validate_args": False, "ignore_index": ignore_index}
    metrics = {
        "acc": MulticlassAccuracy(average="micro", **options),
        "f1_macro": MulticlassF1Score(average="macro", **options),
    }
    if num_classes >= 5:
        metrics["acc_top5"] = MulticlassAccuracy(top_k=5, average="micro", **options)
    return MetricCollection(metrics)


class MistakeSeverity(Metric):
    """How far up the taxonomy a finer head's wrong answers go: for each wrong answer, 1 plus the number of
    coarser levels (`levels`, each a list of the coarse class of every fine class, finer first) at which it
    is wrong too; the mean over wrong answers (0 without any). Rows whose target is `ignore_index` are left
    out."""

    higher_is_better = False
    full_state_update = False

    def __init__(self, levels: list[list[int]], ignore_index: int = -1):
        super().__init__()
        self.ignore_index = ignore_index
        for i, parents in enumerate(levels):
            self.register_buffer(f"parents_{i}", torch.tensor(parents), persistent=False)
        self.num_levels = len(levels)
        self.add_state("severity", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("mistakes", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        # Rows left out are masked, not dropped: dropping them by a mask waits for a GPU to count them.
        keep = target != self.ignore_index
        predicted = preds.argmax(dim=1)
        wrong = (predicted != target) & keep
        target = torch.where(keep, target, 0)  # any class: those rows count nowhere
        severity = wrong.float()
        for i in range(self.num_levels):
            parents = getattr(self, f"parents_{i}")
            severity += wrong & (parents[predicted] != parents[target])
        self.severity += severity.sum()
        self.mistakes += wrong.sum()

    def compute(self) -> torch.Tensor:
        return self.severity / self.mistakes.clamp(min=1)


class ProbabilityAveragePrecision(MultilabelAveragePrecision):
    """torchmetrics' multilabel average precision, updated with probabilities: its own update checks whether
    they are logits, a host read per update on the CPU."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        store_probabilities(self, preds, target)


class ProbabilityF1Score(MultilabelF1Score):
    """torchmetrics' multilabel F1, updated with probabilities: given the decisions at its threshold, as it
    would take them, it skips its check of whether they are logits (a host read on the CPU)."""

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        super().update(preds > self.threshold, target)


def tag_metrics(num_tags: int) -> MetricCollection:
    """A tag column's: map (macro average precision over tags) and f1 (macro, at 0.5), updated with the
    tags' probabilities (sigmoid of the logits)."""
    options = {"num_labels": num_tags, "validate_args": False}
    return MetricCollection(
        {
            "map": ProbabilityAveragePrecision(average="macro", **options),
            "f1": ProbabilityF1Score(average="macro", **options),
        }
    )


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


def column_report(
    key,
    logits: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    levels: list[list[int]] | None = None,
    ignore_index: int = -1,
) -> dict:
    """evaluation_report of one label column over its rows with a label (`ignore_index` marks the others),
    its scalars named `key(metric)` (e.g. test/<column>/acc); with `levels` (MistakeSeverity's, the coarser
    levels read off this column) also the mistakes' severity."""
    keep = labels != ignore_index
    report = evaluation_report(logits[keep], labels[keep], class_names)
    named = {key(k.removeprefix("test/")) if k.startswith("test/") else k: v for k, v in report.items()}
    if levels:
        severity = MistakeSeverity(levels, ignore_index)(logits.float(), labels.long())
        named[key("mistake_severity")] = severity.item()
    return named


def tag_report(
    key, logits: torch.Tensor, targets: torch.Tensor, tag_names: list[str], thresholds: list[float]
) -> dict:
    """A tag column's test figures: `map` (macro average precision over tags), `f1` (macro) and per tag
    average precision, precision, recall and F1 with each tag predicted where its probability reaches its
    threshold, support (images with the tag), and the loss (BCE), all torchmetrics."""
    k = len(tag_names)
    probs, targets = logits.float().sigmoid(), targets.long()
    # Given 0/1 integers torchmetrics takes them as the decisions (its own threshold compares with `>`).
    predicted = (probs.double() >= torch.tensor(thresholds, dtype=torch.float64)).long()
    per_tag = {
        "ap": MultilabelAveragePrecision(k, average=None)(probs, targets),
        "precision": MultilabelPrecision(k, average=None)(predicted, targets),
        "recall": MultilabelRecall(k, average=None)(predicted, targets),
        "f1": MultilabelF1Score(k, average=None)(predicted, targets),
    }
    report = {
        key("loss"): F.binary_cross_entropy_with_logits(logits.float(), targets.float()).item(),
        key("map"): MultilabelAveragePrecision(k, average="macro")(probs, targets).item(),
        key("f1"): MultilabelF1Score(k, average="macro")(predicted, targets).item(),
        key("num_images"): len(targets),
    }
    report["per_tag"] = {
        name: {metric: values[j].item() for metric, values in per_tag.items()}
        | {"support": int(targets[:, j].sum()), "threshold": float(thresholds[j])}
        for j, name in enumerate(tag_names)
    }
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
