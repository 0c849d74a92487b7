"""The evaluation plots: confusion matrix, one-vs-rest ROC curves, a gallery of confident mistakes, a tag
column's precision and recall per tag, and the calibration plots (reliability diagram, accuracy against
coverage)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.calibration import calibration_curve  # noqa: E402
from torchmetrics.classification import MulticlassROC, MultilabelPrecisionRecallCurve  # noqa: E402

from skuvision.outputs import new_file  # noqa: E402


def confusion_matrix_png(
    matrix: list[list[int]], class_names: list[str], path: Path, title: str = ""
) -> Path:
    """Counts per (true, predicted) class, coloured by the true class's share; `title`: the column's name."""
    counts = np.asarray(matrix, dtype=float)
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    size = max(5, 0.5 * k + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=45, ha="right")
    ax.set_yticks(range(k), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if counts[i, j]:
                    color = "white" if rates[i, j] > 0.5 else "black"
                    ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", fontsize=7, color=color)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title(f"{title + ': ' if title else ''}confusion matrix (counts; colour: row share)")
    return save(fig, path)


def roc_png(
    probs: torch.Tensor, labels: torch.Tensor, class_names: list[str], per_class: dict, path: Path
) -> Path:
    fpr, tpr, _ = MulticlassROC(len(class_names))(probs.float(), labels.long())
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    for i, name in enumerate(class_names[:20]):  # beyond 20 curves the plot is unreadable
        ax.plot(fpr[i].numpy(), tpr[i].numpy(), lw=1, label=f"{name} ({per_class[name]['auroc']:.3f})")
    ax.plot([0, 1], [0, 1], "k--", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("one-vs-rest ROC (AUROC)")
    ax.legend(fontsize=7, loc="lower right")
    return save(fig, path)


def errors_png(
    images: list[np.ndarray], true: list[str], predicted: list[str], confidence: list[float], path: Path
) -> Path:
    """A grid of misclassified images, most confident first, titled with true and predicted labels."""
    n = max(1, len(images))
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, t, p, c in zip(axes.flat, images, true, predicted, confidence, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
        ax.set_title(f"true: {t}\npred: {p} ({c:.0%})", fontsize=8)
    if not images:
        axes.flat[0].text(0.5, 0.5, "no mistakes", ha="center", va="center")
    fig.suptitle("most confident mistakes", fontsize=10)
    return save(fig, path)


def tags_png(
    probs: torch.Tensor,
    targets: torch.Tensor,
    tag_names: list[str],
    per_tag: dict,
    path: Path,
    title: str = "",
) -> Path:
    """One tag column on the test split: each tag's precision-recall curve (torchmetrics) with the point its
    threshold gives, and precision, recall and F1 per tag at that threshold (the 20 most frequent tags)."""
    shown = sorted(range(len(tag_names)), key=lambda j: -per_tag[tag_names[j]]["support"])[:20]
    curve = MultilabelPrecisionRecallCurve(len(tag_names))(probs.float(), targets.long())
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, max(4.8, 0.35 * len(shown) + 2)))
    for j in shown:
        name, figures = tag_names[j], per_tag[tag_names[j]]
        precision, recall, _ = (c[j].numpy() for c in curve)
        (line,) = left.plot(
            recall, precision, lw=1, label=f"{name} (AP {figures['ap']:.3f}, {figures['support']} images)"
        )
        left.plot(figures["recall"], figures["precision"], "o", color=line.get_color())
    left.set(xlim=(0, 1.01), ylim=(0, 1.02), xlabel="recall", ylabel="precision")
    left.set_title("precision-recall per tag (dot: at its threshold)", fontsize=9)
    left.grid(alpha=0.3)
    left.legend(fontsize=7, loc="lower left")
    rows = np.arange(len(shown))
    for offset, metric in zip((-0.27, 0, 0.27), ("precision", "recall", "f1"), strict=True):
        values = [per_tag[tag_names[j]][metric] for j in shown]
        right.barh(rows + offset, values, height=0.27, label=metric)
    right.set_yticks(rows, [f"{tag_names[j]} (t={per_tag[tag_names[j]]['threshold']:.2f})" for j in shown])
    right.invert_yaxis()
    right.set(xlim=(0, 1), xlabel="at the tag's threshold")
    right.legend(fontsize=8, loc="lower right")
    right.grid(alpha=0.3, axis="x")
    fig.suptitle(f"{title + ': ' if title else ''}tags on the test split", fontsize=10)
    return save(fig, path)


def reliability_png(panels: dict[str, tuple[np.ndarray, np.ndarray, float]], bins: int, path: Path) -> Path:
    """One column per panel title -> (top-1 confidence, correct, ECE): accuracy against mean confidence per
    equal-width bin (sklearn's calibration_curve), over a histogram of the confidences."""
    fig, axes = plt.subplots(
        2, len(panels), figsize=(4.6 * len(panels), 6), squeeze=False, height_ratios=[3, 1], sharex=True
    )
    for (title, (confidence, correct, error)), (top, bottom) in zip(panels.items(), axes.T, strict=True):
        accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins, strategy="uniform")
        top.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect calibration")
        top.plot(mean_confidence, accuracy, marker="o", markersize=4, label="model")
        top.fill_between(mean_confidence, mean_confidence, accuracy, alpha=0.2, color="tab:red", label="gap")
        top.set(xlim=(0, 1), ylim=(0, 1.02), ylabel="accuracy", title=f"{title}\nECE {error:.4f}")
        top.legend(fontsize=8, loc="upper left")
        top.grid(alpha=0.3)
        bottom.hist(confidence, bins=np.linspace(0, 1, bins + 1), color="gray")
        bottom.set_yscale("log")
        bottom.set(xlabel="top-1 confidence", ylabel="images")
    fig.suptitle("reliability diagram (test split, top-1 class)", fontsize=10)
    return save(fig, path)


def coverage_png(
    curves: dict[str, tuple[np.ndarray, np.ndarray]],
    target: float,
    chosen: tuple[float, float] | None,
    on_test: tuple[float, float | None] | None,
    path: Path,
) -> Path:
    """Accuracy of the accepted predictions against the share accepted, one line per split, with the
    target, the threshold's point on val (`chosen`: coverage, accuracy) and on test (`on_test`)."""
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for label, (coverage, accuracy) in curves.items():
        ax.plot(coverage, accuracy, lw=1.2, label=label)
    ax.axhline(target, color="k", ls="--", lw=0.8, label=f"target {target:.1%}")
    if chosen is not None:
        ax.plot(*chosen, "o", color="tab:blue", label=f"threshold on val ({chosen[0]:.1%} accepted)")
    if on_test is not None and on_test[1] is not None:
        ax.plot(
            *on_test, "s", color="tab:orange", label=f"same threshold on test ({on_test[1]:.2%} accurate)"
        )
    lowest = min([target] + [float(np.min(a)) for _, a in curves.values() if len(a)])
    ax.set(xlim=(0, 1.01), ylim=(max(0.0, lowest - 0.02), 1.002))
    ax.set_xlabel("share of images accepted (calibrated confidence >= threshold)")
    ax.set_ylabel("accuracy of the accepted images")
    ax.set_title("accuracy vs coverage: auto-tag the confident, review the rest", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return save(fig, path)


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def save_new(fig, path: Path, dpi: int) -> Path:
    """The figure as a new file at `path` (an earlier file is refused, a half-written one never left),
    closed either way."""
    try:
        with new_file(path) as partial:
            fig.savefig(partial, dpi=dpi)
    finally:
        plt.close(fig)
    return path


def leaderboard_png(rows: list[dict], path: Path, title: str) -> Path:
    """Test accuracy (val accuracy when untested) against training throughput, one point per run."""
    fig, ax = plt.subplots(figsize=(7, 5))
    plotted = [r for r in rows if r["accuracy_pct"] is not None and r["img_per_s"]]
    for row in plotted:
        point = (row["img_per_s"], row["accuracy_pct"])
        ax.scatter(*point, s=40)
        ax.annotate(row["label"], point, fontsize=8, xytext=(4, 4), textcoords="offset points")
    if plotted:
        ax.set_xscale("log")
        ax.margins(x=0.25, y=0.1)  # room for the labels
    else:
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
    failed = len(rows) - len(plotted)
    ax.set_xlabel("training images per second (log scale)")
    ax.set_ylabel("accuracy (%)")
    if failed:
        title += f"\n{failed} run(s) without a result: see leaderboard.md"
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    return save(fig, path)


def accuracy_curves_png(curves: dict[str, list[tuple[float, float]]], path: Path, title: str) -> Path:
    """Test accuracy (%) against wall-clock minutes, one line per run (a point per epoch)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in curves.items():
        minutes, accuracy = zip(*points, strict=True) if points else ((), ())
        ax.plot(minutes, accuracy, marker="o", markersize=3, label=label)
    ax.set_xlabel("wall-clock minutes")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return save(fig, path)
