"""What the audit writes: the CSV files, the gallery PNGs and audit.md."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from torchvision.transforms.v2.functional import to_pil_image

from skuvision.audit.catalogue import Catalogue
from skuvision.audit.duplicates import Pair, is_leakage
from skuvision.data.decode import open_rgb
from skuvision.outputs import new_file, spreadsheet_cell
from skuvision.outputs import write_csv as write_rows
from skuvision.plots import plt, save_new  # pyplot on the file-only backend the evaluation plots set

DPI = 80  # as the evaluation plots (skuvision.plots)


def picture(catalogue: Catalogue, datamodule, i: int) -> np.ndarray:
    """The image as stored (a file at its own size), for galleries."""
    if catalogue.file_backed:
        return np.asarray(open_rgb(catalogue.items[i]))
    return np.asarray(to_pil_image(datamodule.splits[catalogue.splits[i]][int(catalogue.index[i])][0]))


def gallery_png(images: list[np.ndarray], titles: list[str], path: Path, title: str, cols: int = 4) -> Path:
    """A grid of images with a small title each."""
    n = max(1, len(images))
    cols = min(cols, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, text in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        ax.set_title(text, fontsize=7)
    if not images:
        axes.flat[0].text(0.5, 0.5, "nothing found", ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title above the tiles
    return save_new(fig, path, DPI)


def short(item: str, width: int = 28) -> str:
    name = item.rsplit("/", 1)[-1]
    return name if len(name) <= width else "…" + name[-width + 1 :]


def write_label_issues(
    path: Path, catalogue: Catalogue, train: np.ndarray, flagged: np.ndarray, probs: np.ndarray,
    scores: np.ndarray, class_names: list[str], labels: np.ndarray | None = None,
) -> list[dict]:  # fmt: skip
    """One row per flagged training image, lowest label quality first. `labels`: a table column's class
    indices of every image (default: the catalogue's labels)."""
    labels = catalogue.labels if labels is None else labels
    rows = []
    for rank, t in enumerate(flagged, 1):
        i = train[t]
        suggested = int(probs[t].argmax())
        rows.append(
            {
                "rank": rank,
                "index": int(catalogue.index[i]),
                "item": catalogue.items[i],
                "given": class_names[labels[i]],
                "suggested": class_names[suggested],
                "suggested_prob": round(float(probs[t, suggested]), 4),
                "label_quality": round(float(scores[t]), 6),
            }
        )
    write_csv(path, rows, ["rank", "index", "item", "given", "suggested", "suggested_prob", "label_quality"])
    return rows


TAG_ISSUE_COLUMNS = [
    "rank", "index", "item", "given", "suggested", "likely_missing", "likely_extra", "label_quality",
]  # fmt: skip


def write_tag_issues(
    path: Path, catalogue: Catalogue, train: np.ndarray, flagged: np.ndarray, probs: np.ndarray,
    scores: np.ndarray, tag_names: list[str], tags: np.ndarray, separator: str,
) -> list[dict]:  # fmt: skip
    """One row per flagged training image of a tag column, lowest label quality first: its tags, those the
    out-of-sample probabilities reach 0.5 for, and the difference both ways."""

    def joined(mask) -> str:
        return separator.join(name for name, on in zip(tag_names, mask, strict=True) if on)

    rows = []
    for rank, t in enumerate(flagged, 1):
        i = train[t]
        given, seen = tags[i] > 0, probs[t] >= 0.5
        rows.append(
            {
                "rank": rank,
                "index": int(catalogue.index[i]),
                "item": catalogue.items[i],
                "given": joined(given),
                "suggested": joined(seen),
                "likely_missing": joined(seen & ~given),
                "likely_extra": joined(given & ~seen),
                "label_quality": round(float(scores[t]), 6),
            }
        )
    write_csv(path, rows, TAG_ISSUE_COLUMNS)
    return rows


def class_name(class_names: list[str], k: int) -> str:
    """A label's name; "" for a table row without one (-1)."""
    return class_names[k] if k >= 0 else ""


DUPLICATE_COLUMNS = [
    "kind", "item_a", "split_a", "label_a", "item_b", "split_b", "label_b", "similarity", "mirrored",
    "same_label", "leakage",
]  # fmt: skip


def duplicate_rows(pairs: list[Pair], catalogue: Catalogue, class_names: list[str]) -> list[dict]:
    rows = []
    for p in pairs:
        a, b = p.a, p.b
        if catalogue.splits[b] == "train" and catalogue.splits[a] != "train":
            a, b = b, a  # the training image first
        rows.append(
            {
                "kind": p.kind,
                "item_a": catalogue.items[a],
                "split_a": catalogue.splits[a],
                "label_a": class_name(class_names, catalogue.labels[a]),
                "item_b": catalogue.items[b],
                "split_b": catalogue.splits[b],
                "label_b": class_name(class_names, catalogue.labels[b]),
                "similarity": round(p.similarity, 6),
                "mirrored": p.mirrored,
                "same_label": bool(catalogue.labels[a] == catalogue.labels[b]),
                "leakage": is_leakage(p, catalogue),
                "_a": a,
                "_b": b,
            }
        )
    rows.sort(key=lambda r: (not r["leakage"], r["kind"] != "exact", -r["similarity"]))
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    """`columns` of each row (other keys are left out), as a new spreadsheet-safe CSV file."""
    write_rows(path, columns, ([row.get(c, "") for c in columns] for row in rows))


def write_image_issues(path: Path, catalogue: Catalogue, issues: pd.DataFrame, failed: pd.Series) -> int:
    checks = issues.attrs["checks"]
    table = pd.DataFrame(
        {
            "item": catalogue.items,
            "split": catalogue.splits,
            "index": catalogue.index,
            "issues": failed.to_numpy(),
            **{f"{c}_score": issues[f"{c}_score"].round(6).to_numpy() for c in checks},
        }
    )
    table = table[table["issues"] != ""].copy()
    for column in table.columns:
        if pd.api.types.is_string_dtype(table[column]):
            table[column] = table[column].map(spreadsheet_cell)
    with new_file(path) as partial:
        table.to_csv(partial, index=False)
    return len(table)


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
