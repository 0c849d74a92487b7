"""audit(cfg): what a checkpoint and its data reveal about the catalogue, written to <run folder>/audit/.

- label_issues.csv and label_issues.png: training images whose given label is likely wrong (cleanlab on
  out-of-sample predicted probabilities from K-fold cross-fitting); with several label and tag columns, one
  label_issues_<column>.csv and .png per column instead (a tag column's rows say which tags look missing or
  extra);
- duplicates.csv and duplicates.png: exact and near duplicates within and across splits, with `leakage`
  marking a val or test image that duplicates a training image;
- image_issues.csv: cleanvision's quality checks;
- audit.md: the figures, class counts per split included; audit.json: the same figures for scripts.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_lightning import seed_everything

from skuvision.assembly import build_trainer, from_checkpoint
from skuvision.audit import labels as label_audit
from skuvision.audit import report
from skuvision.audit.catalogue import DESCRIPTORS, Catalogue, embed_catalogue
from skuvision.audit.duplicates import EVALUATION_SPLITS, find_duplicates
from skuvision.audit.quality import flagged, meaningful_checks, run_imagelab
from skuvision.config import plain, set_threads
from skuvision.errors import SkuvisionError
from skuvision.metrics import tag_metrics
from skuvision.models.heads import Head, heads_from_specs
from skuvision.outputs import refuse_existing, write_new_json, write_new_text
from skuvision.tasks.launch import check_devices
from skuvision.tasks.utils import print_summary, resolve_checkpoint

log = logging.getLogger("skuvision")

LABEL_MODES = ("cheap", "full", "none")
FILTERS = (
    "predicted_neq_given",
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "low_normalized_margin",
    "low_self_confidence",
)  # fmt: skip  (cleanlab's find_label_issues filter_by)


def audit(cfg: DictConfig) -> dict:
    set_threads(cfg.get("threads"))
    resolve_checkpoint(cfg)
    seed_everything(cfg.seed, workers=True)
    options = cfg.audit
    if options.label_mode not in LABEL_MODES:
        raise SkuvisionError(f"audit.label_mode={options.label_mode!r}: use one of {', '.join(LABEL_MODES)}")
    if options.filter_by not in FILTERS:
        raise SkuvisionError(f"audit.filter_by={options.filter_by!r}: use one of {', '.join(FILTERS)}")
    if not 0 < options.near_threshold <= 1:
        raise SkuvisionError(f"audit.near_threshold={options.near_threshold}: use a cosine in (0, 1]")
    if options.descriptor not in DESCRIPTORS:
        raise SkuvisionError(f"audit.descriptor={options.descriptor!r}: use one of {', '.join(DESCRIPTORS)}")
    out = Path(cfg.paths.output_dir) / "audit"
    refuse_existing([out], "run it into a new run folder, or remove it")
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split="train")
    datamodule.prepare_data()
    datamodule.setup("predict")
    if "train" not in datamodule.splits:
        raise SkuvisionError(f"the data config has no train split (it has {sorted(datamodule.splits)})")
    class_names = list(datamodule.class_names)  # labels index the data's classes (the model may differ)
    train_cfg = None
    if options.label_mode != "none":  # refuse too many folds before the model runs
        train_labels = np.asarray(datamodule.split_labels("train"), dtype=int)
        label_audit.stratified_folds(train_labels, class_names, int(options.folds), cfg.seed)
    if options.label_mode == "full":  # before hours of work: refuse a missing training config now
        data_cfg = plain(cfg.data) if cfg.get("data") else dict(module.hparams.data)
        train_cfg = label_audit.training_config(cfg.ckpt_path, options, data_cfg)
        check_devices(train_cfg.trainer)
    trainer = build_trainer(cfg, enable_checkpointing=False)
    catalogue = embed_catalogue(trainer, module, datamodule, options.descriptor, int(options.grid))
    log.info("audit: %d images embedded (%s)", len(catalogue), ", ".join(datamodule.splits))
    summary: dict = {
        "checkpoint": str(cfg.ckpt_path),
        "images": len(catalogue),
        "class_counts": {
            split: dict(zip(class_names, counts, strict=True))
            for split, counts in datamodule.class_counts().items()
        },
    }
    md = [
        f"# Catalogue audit\n\ncheckpoint `{cfg.ckpt_path}`, {len(catalogue)} images\n",
        class_table(summary),
    ]

    # Image quality and exact duplicates: one pass of cleanvision over every split.
    checks, skipped = meaningful_checks(list(options.quality_checks), catalogue, datamodule.in_chans)
    if not options.quality:
        checks, skipped = [], {"every check": "audit.quality=false"}
    issues = run_imagelab(datamodule, catalogue, checks, n_jobs=max(1, datamodule.num_workers))
    failed = flagged(issues)
    report.write_image_issues(out / "image_issues.csv", catalogue, issues, failed)
    summary["image_quality"] = quality_counts(catalogue, issues, checks)
    md.append(quality_section(summary["image_quality"], skipped, datamodule.splits))

    pairs = find_duplicates(
        catalogue,
        issues.attrs["exact_sets"],
        class_names,
        float(options.near_threshold),
        int(options.neighbours),
        bool(options.mirrored),
        int(options.max_dim),
        cfg.seed,
    )
    rows = report.duplicate_rows(pairs, catalogue, class_names)
    report.write_csv(out / "duplicates.csv", rows, report.DUPLICATE_COLUMNS)
    shown = rows[: options.gallery]
    report.gallery_png(
        [report.picture(catalogue, datamodule, r[key]) for r in shown for key in ("_a", "_b")],
        [t for r in shown for t in pair_titles(r)],
        out / "duplicates.png",
        "duplicate pairs (leakage first)",
    )
    summary["duplicates"] = duplicate_counts(rows, catalogue, float(options.near_threshold))
    summary["duplicates"]["descriptor"] = f"{options.descriptor}, grid {options.grid}"
    md.append(duplicate_section(summary["duplicates"], rows, options))

    if options.label_mode != "none":
        summary["label_issues"] = audit_labels(cfg, train_cfg, catalogue, datamodule, out, md)
    write_new_json(out / "audit.json", summary)
    md.append("Files: " + ", ".join(f"`{p.name}`" for p in sorted(out.iterdir()) if p.is_file()) + ".\n")
    write_new_text(out / "audit.md", "\n".join(md))
    print(f"audit written to {out}")
    print_summary("audit", [out / "audit.md", out / "audit.json"], {"images": summary["images"]})
    return summary


def audit_labels(cfg, train_cfg, catalogue: Catalogue, datamodule, out: Path, md: list[str]) -> dict:
    if catalogue.targets is not None:
        return audit_columns(cfg, train_cfg, catalogue, datamodule, out, md)
    options = cfg.audit
    class_names = list(datamodule.class_names)
    train = catalogue.of_split("train")
    labels = catalogue.labels[train]
    folds = int(options.folds)
    if options.label_mode == "cheap":
        how = f"logistic regression on the checkpoint's embeddings, {folds}-fold cross-fitting"
        probs = label_audit.cheap_pred_probs(
            catalogue.embeddings[train], labels, class_names, folds, cfg.seed, float(options.regularization)
        )
    else:
        how = f"{folds} trainings of the checkpoint's config, each predicting the fold it did not see"
        probs = label_audit.full_pred_probs(
            train_cfg, datamodule, labels, class_names, folds, cfg.seed, out / "folds"
        )
    flagged_idx, scores = label_audit.label_issues(labels, probs, options.filter_by)
    rows = report.write_label_issues(
        out / "label_issues.csv", catalogue, train, flagged_idx, probs, scores, class_names
    )
    shown = rows[: options.gallery]
    report.gallery_png(
        [report.picture(catalogue, datamodule, train[t]) for t in flagged_idx[: options.gallery]],
        [label_title(r) for r in shown],
        out / "label_issues.png",
        "likely label errors (lowest label quality first)",
    )
    result = {
        "mode": options.label_mode,
        "folds": folds,
        "flagged": len(rows),
        "flagged_share": round(len(rows) / max(1, len(train)), 6),
        "out_of_sample_accuracy": round(float((probs.argmax(1) == labels).mean()), 6),
        "flagged_indices": [int(catalogue.index[train[t]]) for t in flagged_idx],
    }
    table = [
        [r["rank"], f"`{report.short(r['item'], 40)}`", r["given"], r["suggested"], r["suggested_prob"],
         r["label_quality"]]
        for r in rows[: options.table_rows]
    ]  # fmt: skip
    md.insert(
        2,
        f"## Label issues (training split)\n\n{how}; cleanlab `find_label_issues` "
        f"(filter_by={options.filter_by}).\n\n"
        f"- {len(rows)} of {len(train)} training images flagged ({result['flagged_share']:.2%})\n"
        f"- out-of-sample predictions agree with the given label for "
        f"{result['out_of_sample_accuracy']:.2%}\n\n"
        + report.markdown_table(["rank", "item", "given", "suggested", "p", "label quality"], table)
        + "\n\n![likely label errors](label_issues.png)\n",
    )
    return result


def label_title(row: dict) -> str:
    return (
        f"#{row['index']} given: {row['given']}\nsuggested: {row['suggested']} ({row['suggested_prob']:.0%})"
    )


def tag_title(row: dict) -> str:
    return (
        f"#{row['index']} given: {row['given'] or '-'}\nmissing: {row['likely_missing'] or '-'}, "
        f"extra: {row['likely_extra'] or '-'}"
    )


def column_file(column: str) -> str:
    """label_issues_<column>, the column's name kept to characters every file system takes."""
    return "label_issues_" + re.sub(r"[^\w-]", "_", column)


def audit_columns(cfg, train_cfg, catalogue: Catalogue, datamodule, out: Path, md: list[str]) -> dict:
    """A table's label and tag columns: one K-fold cross-fitting gives every head's out-of-sample
    probabilities; each column gets its own cleanlab filter, CSV and gallery (skuvision.audit.labels)."""
    options = cfg.audit
    heads = heads_from_specs(datamodule.heads)  # the data's columns and classes, which the targets index
    class_names = list(datamodule.class_names)
    train = catalogue.of_split("train")
    labels = catalogue.labels[train]  # the first label column's: what the folds are stratified by
    targets = {column: values[train] for column, values in catalogue.targets.items()}
    folds = int(options.folds)
    if options.label_mode == "cheap":
        how = f"logistic regressions on the checkpoint's embeddings, {folds}-fold cross-fitting"
        splits = label_audit.fold_splits(labels, class_names, folds, cfg.seed)
        features = catalogue.embeddings[train]
        probs = label_audit.cheap_head_probs(features, targets, heads, splits, float(options.regularization))
    else:
        how = f"{folds} trainings of the checkpoint's config, each predicting the fold it did not see"
        probs = label_audit.full_pred_probs(
            train_cfg, datamodule, labels, class_names, folds, cfg.seed, out / "folds", heads=heads
        )
    result: dict = {"mode": options.label_mode, "folds": folds, "columns": {}}
    sections = []
    for head in heads:
        column, name = head.column, column_file(head.column)
        flagged, scores = label_audit.column_issues(head, targets[column], probs[column], options.filter_by)
        issues = (out / f"{name}.csv", catalogue, train, flagged, probs[column], scores, head.classes)
        if head.kind == "tags":
            separator = getattr(datamodule, "tag_separator", ";")
            rows = report.write_tag_issues(*issues, catalogue.targets[column], separator)
            titles = [tag_title(r) for r in rows[: options.gallery]]
        else:
            rows = report.write_label_issues(*issues, catalogue.targets[column])
            titles = [label_title(r) for r in rows[: options.gallery]]
        report.gallery_png(
            [report.picture(catalogue, datamodule, train[t]) for t in flagged[: options.gallery]],
            titles,
            out / f"{name}.png",
            f"{column}: likely {'tag' if head.kind == 'tags' else 'label'} errors (lowest quality first)",
        )
        summary = column_figures(head, targets[column], probs[column]) | {
            "flagged": len(flagged),
            "flagged_indices": [int(catalogue.index[train[t]]) for t in flagged],
            "file": f"{name}.csv",
        }
        summary["flagged_share"] = round(len(flagged) / max(1, summary["images"]), 6)
        result["columns"][column] = summary
        sections.append(column_section(head, summary, rows, name, options))
    md.insert(
        2,
        f"## Label issues (training split)\n\n{how}, one head per column; cleanlab `find_label_issues` per "
        f"label column over the rows with a value, its multi-label version per tag column "
        f"(filter_by={options.filter_by}).\n\n" + "\n".join(sections),
    )
    return result


def column_figures(head: Head, targets: np.ndarray, probs: np.ndarray) -> dict:
    """How far the out-of-sample probabilities agree with a column's given values: accuracy over the rows
    with a value, or a tag column's mAP (torchmetrics, as training's val/<column>/map)."""
    figures: dict = {"kind": head.kind} | ({"source": head.source} if head.derived else {})
    if head.kind == "tags":
        scores = tag_metrics(len(head.classes))(
            torch.from_numpy(probs).float(), torch.from_numpy(targets).long()
        )
        return figures | {"images": len(targets), "out_of_sample_map": round(float(scores["map"]), 6)}
    present = targets >= 0
    agree = float((probs[present].argmax(1) == targets[present]).mean()) if present.any() else float("nan")
    return figures | {"images": int(present.sum()), "out_of_sample_accuracy": round(agree, 6)}


def column_section(head: Head, summary: dict, rows: list[dict], name: str, options) -> str:
    if head.kind == "tags":
        agreement = f"out-of-sample mAP over the tags {summary['out_of_sample_map']:.3f}"
        header = ["rank", "item", "given", "likely missing", "likely extra", "label quality"]
        keys = ["given", "likely_missing", "likely_extra", "label_quality"]
    else:
        accuracy = summary["out_of_sample_accuracy"]
        agreement = f"out-of-sample predictions agree with the given label for {accuracy:.2%}"
        header = ["rank", "item", "given", "suggested", "p", "label quality"]
        keys = ["given", "suggested", "suggested_prob", "label_quality"]
    table = [
        [r["rank"], f"`{report.short(r['item'], 40)}`", *(r[k] for k in keys)]
        for r in rows[: options.table_rows]
    ]
    source = f" (read off {head.source})" if head.derived else ""
    share = summary["flagged_share"]
    flagged = f"{summary['flagged']} of {summary['images']} training images flagged ({share:.2%})"
    return (
        f"### {head.column}{source}\n\n- {flagged}; {agreement}\n\n"
        + report.markdown_table(header, table)
        + f"\n\n![{head.column}]({name}.png)\n"
    )


def pair_titles(row: dict) -> tuple[str, str]:
    """Left tile: the first image; right tile: its duplicate, how it was found and whether it leaks."""
    how = f"{'LEAK ' if row['leakage'] else ''}{row['kind']} {row['similarity']:.3f}"
    how += " mirror" if row["mirrored"] else ""
    return (
        f"{tile_name(row['item_a'], row['split_a'])}\n{row['label_a']}",
        f"{how}\n{tile_name(row['item_b'], row['split_b'])}: {row['label_b']}",
    )


def tile_name(item: str, split: str) -> str:
    """`val[12]` for in-memory items (the split is in the name), else `split: file name`."""
    return item if item.startswith(f"{split}[") else f"{split}: {report.short(item, 22)}"


def class_table(summary: dict) -> str:
    counts = summary["class_counts"]
    splits = list(counts)
    names = list(next(iter(counts.values())))
    rows = [[name, *(counts[s][name] for s in splits)] for name in names]
    rows.append(["**all**", *(sum(counts[s].values()) for s in splits)])
    return "## Class counts\n\n" + report.markdown_table(["class", *splits], rows) + "\n"


def quality_counts(catalogue: Catalogue, issues, checks: list[str]) -> dict:
    splits = np.asarray(catalogue.splits)
    return {
        check: {
            s: int(issues[f"is_{check}_issue"].to_numpy()[splits == s].sum()) for s in dict.fromkeys(splits)
        }
        for check in checks
    }


def quality_section(counts: dict, skipped: dict, splits) -> str:
    lines = ["## Image quality (cleanvision)\n"]
    if counts:
        rows = [[check, *(per_split[s] for s in splits)] for check, per_split in counts.items()]
        lines.append(
            report.markdown_table(["check", *splits], rows) + "\n\nImages flagged: `image_issues.csv`."
        )
    for check, why in skipped.items():
        lines.append(f"- {check} skipped: {why}")
    return "\n".join(lines) + "\n"


def duplicate_counts(rows: list[dict], catalogue: Catalogue, threshold: float) -> dict:
    def pair_count(kind: str, across: bool) -> int:
        return sum(r["kind"] == kind and (r["split_a"] != r["split_b"]) == across for r in rows)

    leaked = {}
    for split in EVALUATION_SPLITS:
        images = {r["item_b"] for r in rows if r["leakage"] and r["split_b"] == split}
        total = len(catalogue.of_split(split))
        if total:
            leaked[split] = {"images": len(images), "of": total, "share": round(len(images) / total, 6)}
    return {
        "near_threshold": threshold,
        "exact_pairs_within_split": pair_count("exact", False),
        "exact_pairs_across_splits": pair_count("exact", True),
        "near_pairs_within_split": pair_count("near", False),
        "near_pairs_across_splits": pair_count("near", True),
        "mirrored_pairs": sum(r["mirrored"] for r in rows),
        "pairs_with_different_labels": sum(not r["same_label"] for r in rows),
        "leaked": leaked,
    }


def duplicate_section(counts: dict, rows: list[dict], options) -> str:
    leaked = ", ".join(
        f"{split} {v['images']} of {v['of']} ({v['share']:.2%})" for split, v in counts["leaked"].items()
    )
    table = [
        [r["kind"], r["split_a"], f"`{report.short(r['item_a'])}`", r["split_b"],
         f"`{report.short(r['item_b'])}`", f"{r['similarity']:.4f}", "yes" if r["mirrored"] else "",
         "yes" if r["leakage"] else ""]
        for r in rows[: options.table_rows]
    ]  # fmt: skip
    return (
        "## Duplicates and leakage\n\n"
        f"Exact: the same decoded pixels. Near: cosine >= {counts['near_threshold']} of centered "
        f"descriptors ({counts['descriptor']}), mirror images included.\n\n"
        f"- exact pairs: {counts['exact_pairs_within_split']} within a split, "
        f"{counts['exact_pairs_across_splits']} across splits\n"
        f"- near pairs: {counts['near_pairs_within_split']} within a split, "
        f"{counts['near_pairs_across_splits']} across splits "
        f"({counts['mirrored_pairs']} through a mirror image)\n"
        f"- pairs whose labels differ: {counts['pairs_with_different_labels']}\n"
        f"- **leakage** (val/test images that duplicate a training image): {leaked or 'none'}\n\n"
        + report.markdown_table(["kind", "split", "item", "split", "item", "cosine", "mirror", "leak"], table)
        + "\n\n![duplicate pairs](duplicates.png)\n"
    )
