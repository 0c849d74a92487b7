"""evaluate(cfg): a checkpoint on its test split (or another data config) -> metrics.json and plots; for a
model with several heads (skuvision.models.heads) the figures, plots and calibration of each column."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from pytorch_lightning import seed_everything
from torchvision.transforms.v2.functional import to_pil_image

from skuvision import calibration, plots
from skuvision.assembly import (
    build_trainer,
    close_loggers,
    data_module,
    from_checkpoint,
    instantiate_loggers,
)
from skuvision.config import set_threads
from skuvision.errors import SkuvisionError
from skuvision.explain import Explainer, check_method, overlay
from skuvision.features import extract
from skuvision.gallery import Answer, Tile, gallery_options, write_gallery
from skuvision.metrics import column_report, evaluation_report, tag_report
from skuvision.models.heads import MISSING, Head
from skuvision.outputs import file_sha256, new_file, refuse_existing, write_csv, write_new_json
from skuvision.readout import DEFAULT_TAG_THRESHOLD, concat_batches, head_probs, read_heads
from skuvision.tasks.utils import command, log_images, print_summary, resolve_checkpoint, shown
from skuvision.tta import check_tta
from skuvision.unknown import (
    REFERENCE_FILE,
    UNKNOWN_FILE,
    eval_unknown,
    unknown_options,
)
from skuvision.unknown import describe as describe_unknown

log = logging.getLogger("skuvision")

RESULTS = ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "errors.png")
CALIBRATION_RESULTS = (calibration.CALIBRATION_FILE, "reliability.png", "coverage.png")
ERRORS_PAGE = ("errors.html",)  # the one-label model's mistakes, most confident first (gallery=false: none)


def result_names(heads: list[Head], calibrate: bool, gallery: bool = False) -> list[str]:
    """Every file eval writes for a model with these heads: the one-label model's RESULTS (and
    CALIBRATION_RESULTS), or per column a confusion matrix or tag plot (and reliability and coverage plots
    of each trained label column)."""
    if not any(h.column for h in heads):
        return list(RESULTS + (CALIBRATION_RESULTS if calibrate else ()) + (ERRORS_PAGE if gallery else ()))
    names = ["metrics.json", "predictions.csv", *(ERRORS_PAGE if gallery else ())]
    names += [
        f"tags_{h.column}.png" if h.kind == "tags" else f"confusion_matrix_{h.column}.png" for h in heads
    ]
    if calibrate:
        names.append(calibration.CALIBRATION_FILE)
        trained = [h.column for h in heads if h.kind == "label" and not h.derived]
        names += [f"{plot}_{column}.png" for column in trained for plot in ("reliability", "coverage")]
    return names


def evaluate(cfg: DictConfig) -> dict:
    set_threads(cfg.get("threads"))
    resolve_checkpoint(cfg)
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    gallery = gallery_options(cfg)
    if check_method(cfg.get("explain")) and gallery is None:
        raise SkuvisionError("explain=gradcam draws into errors.html, which gallery=false leaves out")
    unknown = unknown_options(cfg)
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split="test")
    module.tta = check_tta(cfg.get("tta") or module.tta)
    # One check of every file this run writes, before any is: a model with several heads names its files by
    # its columns, so the list is known once the checkpoint is.
    names = result_names(module.heads, cfg.get("calibrate", True), gallery is not None)
    names += [UNKNOWN_FILE, REFERENCE_FILE] if unknown and unknown["calibrate"] else []
    refuse_existing([output_dir / name for name in names], "run it into a new run folder, or remove it")
    if module.multi_head is not None:
        tag_options(cfg)
    loggers = instantiate_loggers(cfg.get("logger"))
    # A logger writing into a fixed folder (the CSV logger's version "") would empty an earlier run's file.
    logger_dirs = [Path(d) for d in (getattr(logger, "log_dir", None) for logger in loggers) if d]
    refuse_existing(logger_dirs, "run it into a new run folder, or remove it")
    trainer = build_trainer(cfg, loggers)
    try:
        found = extract(trainer, module, datamodule, logits=True, features=bool(unknown))
        logits, labels = found.logits, concat_batches(found.metas)
        files = datamodule.sample_paths("test")
        extra = {}
        if unknown:  # first: its refusals (no training split, unreadable folder) come before any file
            # The reference and threshold come from the catalogue the checkpoint was trained on, also when
            # data= evaluates it elsewhere.
            catalogue = datamodule
            if cfg.get("data") is not None:
                catalogue = data_module(module.hparams.data, module.input_config, "train")
            extra["unknown"], _ = eval_unknown(
                unknown,
                trainer,
                module,
                catalogue,
                (logits, found.features),
                output_dir,
                file_header(cfg, module),
                cfg.seed,
            )
        if module.multi_head is not None:
            report, pngs = evaluate_heads(
                cfg, trainer, module, datamodule, (logits, labels), files, output_dir, extra
            )
        else:
            report, pngs = evaluate_one(
                cfg, trainer, module, datamodule, (logits, labels), files, output_dir, extra
            )
        scalars = {k: v for k, v in report.items() if k.startswith("test/")}
        calibrated = report.get("calibration", {})
        by_column = (
            calibrated if module.multi_head is not None and "skipped" not in calibrated else {"": calibrated}
        )
        scalars |= {
            "/".join(filter(None, ("calibration", column, k))): v
            for column, part in by_column.items()
            for k, v in part.items()
            if isinstance(v, float) and k != "target"
        }
        for logger in loggers:
            logger.log_metrics(scalars)
        log_images(loggers, pngs)
        print(f"test/acc = {report['test/acc']:.4f}   run folder: {output_dir}")
        eval_summary(cfg, report, output_dir, names)
        return report
    finally:
        close_loggers(loggers)


def eval_summary(cfg, report: dict, output_dir: Path, names: list[str]) -> str:
    """Its files, test/acc (and the threshold), and predict.py with this folder's calibration."""
    wrote = [output_dir / name for name in names if (output_dir / name).exists()]
    figures = {"test/acc": f"{report['test/acc']:.4f}"}
    threshold = report.get("calibration", {}).get("threshold")
    if isinstance(threshold, float):
        figures["threshold"] = f"{threshold:.4f}"
    calibrated = (output_dir / calibration.CALIBRATION_FILE).is_file()
    overrides = [f"ckpt_path={shown(cfg.ckpt_path)}", "input=<photos>"]
    overrides += [f"calibration={shown(output_dir)}"] if calibrated else []
    unknown = report.get("unknown", {})
    for line in describe_unknown(unknown):
        print(line)
    if unknown.get("other"):
        figures["unknown AUROC"] = f"{unknown['other']['auroc']:.4f}"
        figures["unknown FPR@95TPR"] = f"{unknown['other']['fpr_at_95_tpr']:.4f}"
    overrides += [f"unknown={shown(output_dir)}"] if (output_dir / UNKNOWN_FILE).is_file() else []
    return print_summary("eval", wrote, figures, [command("predict.py", *overrides)])


def evaluate_one(
    cfg, trainer, module, datamodule, test: tuple, files, output_dir: Path, extra: dict | None = None
) -> tuple[dict, list[Path]]:
    """The one-label model: metrics.json, predictions.csv, the plots (and calibration)."""
    logits, labels = test
    test_set = datamodule.splits["test"]  # Trainer.predict has set the data module up
    report = evaluation_report(logits, labels, module.class_names)
    pngs = write_plots(
        report, logits, labels, test_set, module.class_names, output_dir, cfg.get("errors", 16)
    )
    options = gallery_options(cfg)
    if options:
        explained = explained_by(cfg, module, datamodule)
        write_errors_page(
            output_dir / ERRORS_PAGE[0],
            logits,
            labels,
            files,
            test_set,
            module.class_names,
            options,
            explained,
        )
    if cfg.get("calibrate", True):
        report["calibration"], calibration_pngs = calibrate(
            cfg, trainer, module, datamodule, test, output_dir
        )
        pngs += calibration_pngs
    report |= extra or {}
    write_new_json(
        output_dir / "metrics.json", {**report, "checkpoint": str(cfg.ckpt_path), "tta": module.tta}
    )
    write_predictions(output_dir / "predictions.csv", logits, labels, files, module.class_names)
    return report, pngs


def tag_options(cfg) -> tuple[str, int]:
    """tag_threshold and tag_min_support, checked before any work."""
    objective, min_support = cfg.get("tag_threshold", "f1"), cfg.get("tag_min_support", 10)
    if objective not in calibration.TAG_OBJECTIVES:
        raise SkuvisionError(
            f"tag_threshold={objective}: use f1 (each tag's threshold of the highest val F1) or precision "
            "(the lowest reaching target_precision)"
        )
    if not isinstance(min_support, int) or min_support < 1:
        raise SkuvisionError(
            f"tag_min_support={min_support}: give a count of val images, 1 or more (e.g. 10)"
        )
    return objective, min_support


def evaluate_heads(
    cfg, trainer, module, datamodule, test: tuple, files, output_dir: Path, extra: dict | None = None
) -> tuple[dict, list[Path]]:
    """Several heads: each label column's figures over its rows with a label, each tag column's at the
    per-tag thresholds chosen on val (0.5 without calibration), plots per column; with calibrate, fitted
    per column first (calibrate_heads)."""
    heads = module.heads
    logits, targets = test
    for head in heads:
        if head.kind == "label":
            labelled(head, test, "test")  # each label column's figures need rows with a value
    saved, calibration_pngs = None, []
    if cfg.get("calibrate", True):
        calibrated, saved, calibration_pngs = calibrate_heads(
            cfg, trainer, module, datamodule, test, output_dir
        )
    temperatures, _, tag_thresholds = calibration.calibration_for_heads(saved) if saved else ({}, {}, {})
    how = (
        f"chosen on val (tag_threshold={cfg.get('tag_threshold', 'f1')})" if saved else "0.5 (no calibration)"
    )
    report = heads_report(heads, logits, targets, tag_thresholds, how)
    if cfg.get("calibrate", True):
        report["calibration"] = calibrated
    pngs = write_head_plots(report, heads, logits, targets, output_dir) + calibration_pngs
    report |= extra or {}
    write_new_json(
        output_dir / "metrics.json", {**report, "checkpoint": str(cfg.ckpt_path), "tta": module.tta}
    )
    probs = head_probs(heads, logits, temperatures)
    write_head_predictions(output_dir / "predictions.csv", heads, probs, targets, files, tag_thresholds)
    options = gallery_options(cfg)
    if options:
        test_set = datamodule.splits["test"]
        first = next((h.column for h in heads if h.kind == "label"), None)
        explained = explained_by(cfg, module, datamodule, first) if first else None
        write_head_errors_page(
            output_dir / ERRORS_PAGE[0], heads, probs, targets, files, test_set, options, explained
        )
    for head in heads:
        main = "map" if head.kind == "tags" else "acc"
        print(f"{head.key('test', main)} = {report[head.key('test', main)]:.4f}")
    return report, pngs


def heads_report(heads: list[Head], logits: dict, targets: dict, tag_thresholds: dict, how: str) -> dict:
    """metrics.json of a model with several heads: the scalars of every column (`test/<column>/...`) and
    under "columns" each one's full report; `test/acc` is the mean over heads of accuracy (a tag column's
    mAP), as training's, and `test/loss` the sum of the trained heads' plain losses (cross-entropy, BCE)."""
    report: dict = {"columns": {}, "test/num_images": len(next(iter(targets.values())))}
    scores, loss = [], 0.0
    for head in heads:

        def key(metric: str, head=head) -> str:
            return head.key("test", metric)

        if head.kind == "tags":
            cuts = [tag_thresholds.get(head.column, {}).get(t, DEFAULT_TAG_THRESHOLD) for t in head.classes]
            part = tag_report(key, logits[head.column], targets[head.column], head.classes, cuts)
            part["thresholds_from"] = how
            scores.append(part[key("map")])
        else:
            levels = [h.parents for h in heads if h.source == head.column]
            part = column_report(
                key, logits[head.column], targets[head.column], head.classes, levels, MISSING
            )
            scores.append(part[key("acc")])
        if not head.derived:
            loss += part[key("loss")]
        report["columns"][head.column] = part
        report |= {k: v for k, v in part.items() if k.startswith("test/")}
    report["test/acc"] = sum(scores) / len(scores)
    report["test/loss"] = loss
    return report


def calibrate(cfg, trainer, module, datamodule, test: tuple, output_dir: Path) -> tuple[dict, list[Path]]:
    """Temperature and threshold fitted on the val split's logits (same model, same TTA as test), reported
    on val and test; calibration.json for predict.py (with T = 1 and no threshold where val is too small to
    back them: see skuvision.calibration), the reliability and coverage plots. Data without a val split gets
    `{"skipped": why}` and a warning instead."""
    target = checked_target(cfg)
    val = val_outputs(trainer, module, datamodule)
    if isinstance(val, str):
        return {"skipped": val}, []
    report = calibration.calibration_report(val, test, target)
    print("\n".join(calibration.describe(report)))
    for warning in (report["temperature_warning"], report["threshold_warning"]):
        if warning:
            log.warning("calibration: %s", warning)
    write_new_json(
        output_dir / calibration.CALIBRATION_FILE,
        {key: report[key] for key in calibration.SAVED_FIELDS} | file_header(cfg, module),
    )
    return report, write_calibration_plots(report, val, test, output_dir)


def checked_target(cfg) -> float:
    target = float(cfg.get("target_precision", 0.99))
    if not 0 < target < 1:
        raise SkuvisionError(
            f"target_precision={target} must be an accuracy in (0, 1), e.g. 0.99: no count of val images can "
            "show 100 %"
        )
    return target


def val_outputs(trainer, module, datamodule) -> tuple | str:
    """The val split's (outputs, labels) through the same data module and Trainer as the test split (val gets
    the test images' transforms and TTA), or why there are none (logged)."""
    val_set = datamodule.splits.get("val")
    if val_set is None or len(val_set) == 0:
        why = (
            "the data has no val split to fit the temperature and threshold on; give it one "
            "(e.g. data.split_fractions with a val share, or a val/ folder), or pass calibrate=false"
        )
        log.warning("calibration skipped: %s", why)
        return why
    datamodule.predict_split = "val"
    outputs = trainer.predict(module, datamodule=datamodule)
    return concat_batches([o["outputs"] for o in outputs]), concat_batches([o["meta"] for o in outputs])


def file_header(cfg, module) -> dict:
    """What ties a calibration.json to its checkpoint, TTA mode and classes (checked by load_calibration)."""
    return {
        "checkpoint": str(cfg.ckpt_path),
        "checkpoint_sha256": file_sha256(cfg.ckpt_path),
        "tta": module.tta,
        "class_names": module.class_names,
    }


def labelled(head: Head, split: tuple, name: str) -> tuple:
    """A label column's (logits, labels) over the split's rows with a value."""
    logits, targets = split
    keep = targets[head.column] != MISSING
    if not keep.any():
        raise SkuvisionError(
            f"no {name} row has a {head.column} value, so its head cannot be measured: fill the column in "
            f"some {name} rows, or leave {head.column} out of data.label_columns"
            + (" (or pass calibrate=false)" if name == "val" else "")
        )
    return logits[head.column][keep], targets[head.column][keep]


def calibrate_heads(
    cfg, trainer, module, datamodule, test: tuple, output_dir: Path
) -> tuple[dict, dict | None, list]:
    """calibrate() per head, on each label column's rows with a value: a trained label column's temperature
    and threshold (calibration_report, its reliability and coverage plots); a coarser level's threshold on
    its probabilities summed from its source's calibrated ones; a tag column's per-tag thresholds
    (tag_threshold, tag_min_support). calibration.json: the one-label file's fields for the first label
    column at the top, and "heads": {column: its entry}. Returns the reports, the file's content (None when
    skipped) and the plots."""
    target = checked_target(cfg)
    objective, min_support = tag_options(cfg)
    heads = module.heads
    val = val_outputs(trainer, module, datamodule)
    if isinstance(val, str):
        return {"skipped": val}, None, []
    splits = {"val": val, "test": test}
    rows = {
        (head.column, name): labelled(head, split, name)
        for head in heads
        if head.kind == "label"
        for name, split in splits.items()
    }
    reports, entries, pngs = {}, {}, []
    by_column = {h.column: h for h in heads}
    for head in heads:  # trained label columns first: the coarser levels need their temperatures
        if head.kind == "label" and not head.derived:
            val_rows, test_rows = rows[head.column, "val"], rows[head.column, "test"]
            reports[head.column] = calibration.calibration_report(val_rows, test_rows, target)
            pngs += write_calibration_plots(
                reports[head.column], val_rows, test_rows, output_dir, f"_{head.column}"
            )
    for head in heads:
        if head.derived:
            source, t = by_column[head.source], reports[head.source]["temperature"]
            before, after = {}, {}
            for name, (logits, targets) in splits.items():
                keep = targets[head.column] != MISSING
                probs = head_probs(
                    [source, head], {source.column: logits[source.column][keep]}, {source.column: t}
                )
                before[name] = rows[head.column, name]
                after[name] = (probs[head.column].log(), targets[head.column][keep])
            reports[head.column] = calibration.level_report(before, after, head.source, t, target)
        elif head.kind == "tags":
            reports[head.column] = calibration.tag_thresholds(
                val[0][head.column].double().sigmoid(),
                val[1][head.column],
                head.classes,
                objective,
                target if objective == "precision" else None,
                min_support,
            )
    for head in heads:
        report = reports[head.column]
        if head.kind == "tags":
            entries[head.column] = {key: report[key] for key in calibration.SAVED_TAG_FIELDS}
            lines = calibration.describe_tags(report)
        else:
            fields = calibration.SAVED_FIELDS if not head.derived else calibration.SAVED_LEVEL_FIELDS
            entries[head.column] = {key: report[key] for key in fields}
            lines = calibration.describe(report)
        entries[head.column]["classes"] = head.classes
        print("\n".join(f"{head.column}: {line}" for line in lines))
        for warning in (report.get("temperature_warning"), report.get("threshold_warning")):
            if warning:
                log.warning("calibration of %s: %s", head.column, warning)
    first = next(h for h in heads if h.kind == "label")
    top = dict(entries[first.column])
    if first.derived:  # its probabilities come from its source's temperature
        top["temperature"] = reports[first.column]["source_temperature"]
    saved = {key: top[key] for key in top if key != "classes"} | file_header(cfg, module) | {"heads": entries}
    write_new_json(output_dir / calibration.CALIBRATION_FILE, saved)
    return reports, saved, pngs


def write_calibration_plots(
    report: dict, val: tuple, test: tuple, output_dir: Path, suffix: str = ""
) -> list[Path]:
    """reliability.png and coverage.png (with `suffix` after the name: one pair per label column)."""
    temperature = report["temperature"]
    panels = {}
    for title, t, key in (
        ("before (T = 1)", 1.0, "before"),
        (f"after (T = {temperature:.3f})", temperature, "after"),
    ):
        confidence, correct = calibration.top1(*test, t)
        panels[title] = (confidence.numpy(), correct.numpy(), report[f"test_ece_{key}"])
    reliability = new_png(
        output_dir / f"reliability{suffix}.png",
        lambda to: plots.reliability_png(panels, calibration.ECE_BINS, to),
    )
    curves = {}
    for split, data in (("val", val), ("test", test)):
        _, accepted, accuracy = calibration.coverage_curve(*calibration.top1(*data, temperature))
        curves[f"{split} ({len(data[1])} images)"] = ((accepted / len(data[1])).numpy(), accuracy.numpy())
    chosen = None
    if report["threshold"] is not None:
        chosen = (report["val_coverage"], report["val_accuracy_at_threshold"])
    on_test = (report["test_coverage"], report["test_accuracy_at_threshold"]) if chosen else None
    return [
        reliability,
        new_png(
            output_dir / f"coverage{suffix}.png",
            lambda to: plots.coverage_png(curves, report["target"], chosen, on_test, to),
        ),
    ]


def mistakes(logits, labels) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Softmax probabilities, predicted classes and the wrong images' indices, most confident first."""
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    wrong = torch.nonzero(predicted != labels).flatten()
    return probs, predicted, wrong[confidence[wrong].argsort(descending=True, stable=True)].tolist()


def write_errors_page(
    path: Path, logits, labels, files, dataset, class_names, options, explained=None
) -> Path:
    """errors.html: the test images predicted wrong, most confident first, each with its true class and the
    top 3 predicted (the file as stored, or the data set's image where there are no files); with
    `explained` (explained_by), each shown mistake's Grad-CAM of the class it was taken for."""
    probs, predicted, wrong = mistakes(logits, labels)
    top_p, top_i = probs.topk(min(3, probs.shape[1]), dim=1)
    tiles = []
    for i in wrong:
        ranked = [(class_names[j], p) for j, p in zip(top_i[i].tolist(), top_p[i].tolist(), strict=True)]
        picture = Path(files[i]) if files else partial(dataset_picture, dataset, i)
        answers = [Answer("", "truth", [(class_names[labels[i]], None)]), Answer("", "label", ranked)]
        tiles.append(Tile(files[i] if files else f"test image {i}", picture, answers))
    if explained:
        shown_wrong = wrong[: options.max_images]
        for tile, overlay_image in zip(
            tiles, explained(dataset, shown_wrong, predicted.tolist()), strict=False
        ):
            tile.extras["Grad-CAM of the predicted class"] = partial(Image.Image.copy, overlay_image)
    summary = f"{len(wrong)} of {len(labels)} test images predicted wrong, the most confident mistakes first"
    write_gallery(path, "errors on the test split", tiles, options, summary)
    return path


def explained_by(cfg, module, datamodule, column: str | None = None):
    """With explain=gradcam, a function (dataset, indices, classes) -> a Grad-CAM overlay per index, of
    classes[index], on the image the model saw; else None."""
    if not check_method(cfg.get("explain")):
        return None
    explainer = Explainer(module, column)
    convert = datamodule.to_model_input

    def overlays(dataset, indices: list[int], classes: list[int]) -> list:
        shown = []
        for start in range(0, len(indices), 16):
            part = indices[start : start + 16]
            images = torch.stack([dataset[i][0] for i in part])
            maps = explainer(convert.normalize(convert.to_unit(images)), [classes[i] for i in part])
            shown += [
                Image.fromarray(overlay(image, heatmap)) for image, heatmap in zip(images, maps, strict=True)
            ]
        return shown

    return overlays


def write_head_errors_page(
    path: Path, heads: list[Head], probs: dict, targets: dict, files, dataset, options, explained=None
) -> Path:
    """errors.html of a model with several heads: the test images with a label column predicted wrong, the
    most confident of its mistakes first; each label column's true (where the row has one) and predicted
    class."""
    answers = read_heads(heads, probs, top_k=1)
    mistakes_of = []
    for i, image in enumerate(answers):
        shown, wrong = [], []
        for head, said in zip(heads, image, strict=True):
            if head.kind != "label":
                continue
            truth, (label, p) = int(targets[head.column][i]), said.ranked[0]
            if truth != MISSING:
                shown.append(Answer(head.column, "truth", [(head.classes[truth], None)]))
                wrong += [p] if head.classes[truth] != label else []
            shown.append(Answer(head.column, "label", [(label, p)]))
        if wrong:
            picture = Path(files[i]) if files else partial(dataset_picture, dataset, i)
            tile = Tile(files[i] if files else f"test image {i}", picture, shown)
            mistakes_of.append((max(wrong), i, tile))
    mistakes_of.sort(key=lambda m: -m[0])
    if explained:  # the first label column's predicted class, as explained_by's column
        first = next(h.column for h in heads if h.kind == "label")
        shown_wrong = [i for _, i, _ in mistakes_of[: options.max_images]]
        overlays = explained(dataset, shown_wrong, probs[first].argmax(dim=1).tolist())
        for (_, _, tile), overlay_image in zip(mistakes_of, overlays, strict=False):
            tile.extras[f"Grad-CAM of the predicted {first}"] = partial(Image.Image.copy, overlay_image)
    summary = (
        f"{len(mistakes_of)} of {len(answers)} test images with a label column predicted wrong, the most "
        "confident mistake first"
    )
    write_gallery(path, "errors on the test split", [t for _, _, t in mistakes_of], options, summary)
    return path


def dataset_picture(dataset, i: int):
    return to_pil_image(dataset[i][0])


def write_plots(
    report, logits, labels, dataset, class_names, output_dir: Path, num_errors: int
) -> list[Path]:
    probs, predicted, worst = mistakes(logits, labels)
    confidence = probs.max(dim=1).values
    worst = worst[:num_errors]
    images = [np.asarray(to_pil_image(dataset[i][0])) for i in worst]
    return [
        new_png(
            output_dir / "confusion_matrix.png",
            lambda to: plots.confusion_matrix_png(report["confusion_matrix"], class_names, to),
        ),
        new_png(
            output_dir / "roc.png",
            lambda to: plots.roc_png(probs, labels, class_names, report["per_class"], to),
        ),
        new_png(
            output_dir / "errors.png",
            lambda to: plots.errors_png(
                images,
                [class_names[labels[i]] for i in worst],
                [class_names[predicted[i]] for i in worst],
                [confidence[i].item() for i in worst],
                to,
            ),
        ),
    ]


def write_head_plots(
    report: dict, heads: list[Head], logits: dict, targets: dict, output_dir: Path
) -> list[Path]:
    """confusion_matrix_<column>.png per label column, tags_<column>.png per tag column."""
    pngs = []
    for head in heads:
        part = report["columns"][head.column]
        if head.kind == "tags":
            probs = logits[head.column].float().sigmoid()
            draw = partial(
                plots.tags_png, probs, targets[head.column], head.classes, part["per_tag"], title=head.column
            )
        else:
            draw = partial(
                plots.confusion_matrix_png, part["confusion_matrix"], head.classes, title=head.column
            )
        name = f"tags_{head.column}.png" if head.kind == "tags" else f"confusion_matrix_{head.column}.png"
        pngs.append(new_png(output_dir / name, lambda to, draw=draw: draw(path=to)))
    return pngs


def new_png(path: Path, draw) -> Path:
    """`draw(to)` saves a figure at `to`: here into a new file `path`, complete or not at all."""
    with new_file(path) as partial:
        draw(partial)
    return path


def write_predictions(path: Path, logits, labels, files: list[str] | None, class_names: list[str]) -> None:
    """One row per test image: its index (and file), true and predicted class, confidence."""
    confidence, predicted = logits.softmax(dim=1).max(dim=1)
    columns = zip(labels.tolist(), predicted.tolist(), confidence.tolist(), strict=True)
    rows = [
        [i, files[i] if files else "", class_names[t], class_names[p], f"{c:.6f}"]
        for i, (t, p, c) in enumerate(columns)
    ]
    write_csv(path, ["index", "path", "true", "predicted", "confidence"], rows)


def write_head_predictions(
    path: Path, heads: list[Head], probs: dict, targets: dict, files: list[str] | None, tag_thresholds: dict
) -> None:
    """One row per test image: its index and file, then per label column the true and predicted class and
    the predicted class's (calibrated) probability, per tag column the true and the predicted tags
    (';'-joined, the most probable first; empty where none)."""
    header = ["index", "path"]
    for head in heads:
        header += [f"{head.column}_true", head.column] + (
            [f"{head.column}_prob"] if head.kind == "label" else []
        )
    answers = read_heads(heads, probs, top_k=1, tag_thresholds=tag_thresholds)
    rows = []
    for i, answer in enumerate(answers):
        row = [i, files[i] if files else ""]
        for head, said in zip(heads, answer, strict=True):
            truth = targets[head.column][i]
            if head.kind == "tags":
                true = ";".join(name for name, on in zip(head.classes, truth.tolist(), strict=True) if on)
                row += [true, ";".join(tag for tag, _ in said.tags)]
            else:
                label, prob = said.ranked[0]
                row += [head.classes[truth] if truth != MISSING else "", label, f"{prob:.6f}"]
        rows.append(row)
    write_csv(path, header, rows)
