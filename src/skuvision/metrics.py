"""The torchmetrics collection every stage logs: accuracy, top-5 accuracy (with >= 5 classes), macro F1."""

from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score


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
