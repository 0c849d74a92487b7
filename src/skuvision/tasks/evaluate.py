"""evaluate(cfg): a checkpoint on its test split (or another data config) -> metrics.json and plots."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from pytorch_lightning import seed_everything
from torchvision.transforms.v2.functional import to_pil_image

from skuvision import calibration, plots
from skuvision.assembly import build_trainer, close_loggers, from_checkpoint, instantiate_loggers
from skuvision.config import set_threads
from skuvision.errors import SkuvisionError
from skuvision.metrics import evaluation_report
from skuvision.outputs import file_sha256, new_file, refuse_existing, write_csv, write_new_json
from skuvision.tasks.utils import log_images
from skuvision.tta import check_tta

log = logging.getLogger("skuvision")

RESULTS = ("metrics.json", "predictions.csv", "confusion_matrix.png", "roc.png", "errors.png")
CALIBRATION_RESULTS = (calibration.CALIBRATION_FILE, "reliability.png", "coverage.png")


def evaluate(cfg: DictConfig) -> dict:
    set_threads(cfg.get("threads"))
    seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    names = RESULTS + (CALIBRATION_RESULTS if cfg.get("calibrate", True) else ())
    refuse_existing([output_dir / name for name in names], "run it into a new run folder, or remove it")
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split="test")
    module.tta = check_tta(cfg.get("tta") or module.tta)
    loggers = instantiate_loggers(cfg.get("logger"))
    # A logger writing into a fixed folder (the CSV logger's version "") would empty an earlier run's file.
    logger_dirs = [Path(d) for d in (getattr(logger, "log_dir", None) for logger in loggers) if d]
    refuse_existing(logger_dirs, "run it into a new run folder, or remove it")
    trainer = build_trainer(cfg, loggers)
    try:
        outputs = trainer.predict(module, datamodule=datamodule)
        logits = torch.cat([o["outputs"] for o in outputs])
        labels = torch.cat([o["meta"] for o in outputs]).cpu()
        test_set = datamodule.splits["test"]  # Trainer.predict has set the data module up
        report = evaluation_report(logits, labels, module.class_names)
        pngs = write_plots(
            report, logits, labels, test_set, module.class_names, output_dir, cfg.get("errors", 16)
        )
        if cfg.get("calibrate", True):
            report["calibration"], calibration_pngs = calibrate(
                cfg, trainer, module, datamodule, (logits.cpu(), labels), output_dir
            )
            pngs += calibration_pngs
        write_new_json(
            output_dir / "metrics.json", {**report, "checkpoint": str(cfg.ckpt_path), "tta": module.tta}
        )
        files = datamodule.sample_paths("test")
        write_predictions(output_dir / "predictions.csv", logits, labels, files, module.class_names)
        scalars = {k: v for k, v in report.items() if k.startswith("test/")}
        scalars |= {
            f"calibration/{k}": v
            for k, v in report.get("calibration", {}).items()
            if isinstance(v, float) and k != "target"
        }
        for logger in loggers:
            logger.log_metrics(scalars)
        log_images(loggers, pngs)
        print(f"test/acc = {report['test/acc']:.4f}   run folder: {output_dir}")
        return report
    finally:
        close_loggers(loggers)


def calibrate(cfg, trainer, module, datamodule, test: tuple, output_dir: Path) -> tuple[dict, list[Path]]:
    """Temperature and threshold fitted on the val split's logits (same model, same TTA as test), reported
    on val and test; calibration.json for predict.py (with T = 1 and no threshold where val is too small to
    back them: see skuvision.calibration), the reliability and coverage plots. Data without a val split gets
    `{"skipped": why}` and a warning instead."""
    target = float(cfg.get("target_precision", 0.99))
    if not 0 < target < 1:
        raise SkuvisionError(
            f"target_precision={target} must be an accuracy in (0, 1), e.g. 0.99: no count of val images can "
            "show 100 %"
        )
    val_set = datamodule.splits.get("val")
    if val_set is None or len(val_set) == 0:
        why = (
            "the data has no val split to fit the temperature and threshold on; give it one "
            "(e.g. data.split_fractions with a val share, or a val/ folder), or pass calibrate=false"
        )
        log.warning("calibration skipped: %s", why)
        return {"skipped": why}, []
    # The same data module and Trainer as the test split: val gets the test images' transforms and TTA.
    datamodule.predict_split = "val"
    outputs = trainer.predict(module, datamodule=datamodule)
    val = (torch.cat([o["outputs"] for o in outputs]).cpu(), torch.cat([o["meta"] for o in outputs]).cpu())
    report = calibration.calibration_report(val, test, target)
    print("\n".join(calibration.describe(report)))
    for warning in (report["temperature_warning"], report["threshold_warning"]):
        if warning:
            log.warning("calibration: %s", warning)
    write_new_json(
        output_dir / calibration.CALIBRATION_FILE,
        {
            "temperature": report["temperature"],  # the one to apply: 1 where the fit was not trustworthy
            "threshold": report["threshold"],  # null: none that val can back, every row goes to review
            "target": target,
            **{
                key: report[key]
                for key in (
                    "temperature_fitted",
                    "temperature_warning",
                    "threshold_chosen",
                    "threshold_needs",
                    "threshold_warning",
                    "val_images",
                    "val_wrong",
                    "val_accepted",
                    "val_accuracy_lower_bound",
                )
            },
            "val_accuracy_at_threshold": report["val_accuracy_at_threshold"],
            "val_coverage": report["val_coverage"],
            "checkpoint": str(cfg.ckpt_path),
            "checkpoint_sha256": file_sha256(cfg.ckpt_path),
            "tta": module.tta,
            "class_names": module.class_names,
        },
    )
    return report, write_calibration_plots(report, val, test, output_dir)


def write_calibration_plots(report: dict, val: tuple, test: tuple, output_dir: Path) -> list[Path]:
    temperature = report["temperature"]
    panels = {}
    for title, t, key in (
        ("before (T = 1)", 1.0, "before"),
        (f"after (T = {temperature:.3f})", temperature, "after"),
    ):
        confidence, correct = calibration.top1(*test, t)
        panels[title] = (confidence.numpy(), correct.numpy(), report[f"test_ece_{key}"])
    reliability = new_png(
        output_dir / "reliability.png", lambda to: plots.reliability_png(panels, calibration.ECE_BINS, to)
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
            output_dir / "coverage.png",
            lambda to: plots.coverage_png(curves, report["target"], chosen, on_test, to),
        ),
    ]


def write_plots(
    report, logits, labels, dataset, class_names, output_dir: Path, num_errors: int
) -> list[Path]:
    probs = logits.softmax(dim=1)
    confidence, predicted = probs.max(dim=1)
    wrong = torch.nonzero(predicted != labels).flatten()
    worst = wrong[confidence[wrong].argsort(descending=True)][:num_errors].tolist()
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
