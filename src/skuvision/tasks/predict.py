"""predict(cfg): a checkpoint on new images -> predictions.csv (path, top-k labels and probabilities).

With `calibration=<eval run folder>`, probabilities are temperature-scaled and a `review` column marks the
rows below the auto-tagging threshold eval.py chose on val."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from skuvision.assembly import build_trainer, from_checkpoint
from skuvision.calibration import calibrated_probs, load_calibration
from skuvision.config import plain, set_threads
from skuvision.data.inputs import InputFilesDataModule, collect_inputs
from skuvision.errors import SkuvisionError
from skuvision.outputs import refuse_existing, write_csv
from skuvision.tta import check_tta

log = logging.getLogger("skuvision")


def predict(cfg: DictConfig) -> Path:
    set_threads(cfg.get("threads"))
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "predictions.csv"
    if out.is_dir() and not any(out.iterdir()):
        raise SkuvisionError(
            f"output={out} is a folder: name the CSV file, e.g. output={out / 'predictions.csv'}"
        )
    refuse_existing([out], "give another output=, or remove it")
    module, _ = from_checkpoint(cfg.ckpt_path)
    module.tta = check_tta(cfg.get("tta") or module.tta)
    paths = collect_inputs(plain(cfg.input))
    datamodule = InputFilesDataModule(
        paths, module.input_config, cfg.batch_size, cfg.num_workers, cache=bool(cfg.get("cache", False))
    )
    trainer = build_trainer(cfg, enable_checkpointing=False)
    # Checked before any image is read: a mismatched calibration is refused up front.
    calibrated = (
        load_calibration(cfg.calibration, cfg.ckpt_path, module.tta, module.class_names)
        if cfg.get("calibration")
        else None
    )
    outputs = trainer.predict(module, datamodule=datamodule)
    logits = torch.cat([o["outputs"] for o in outputs]).cpu()
    probs = calibrated_probs(logits, calibrated["temperature"] if calibrated else 1.0)
    errors = [e for o in outputs for e in o["meta"]]
    k = min(int(cfg.top_k), probs.shape[1])
    top_probs, top_index = probs.topk(k, dim=1)
    review = needs_review(top_probs[:, 0], errors, calibrated["threshold"]) if calibrated else None
    names = module.class_names
    ranked_header = [f"{kind}_{i}" for i in range(1, k + 1) for kind in ("label", "prob")]
    rows = []
    for i, (path, error, p, idx) in enumerate(
        zip(paths, errors, top_probs.tolist(), top_index.tolist(), strict=True)
    ):
        ranked = [v for j, q in zip(idx, p, strict=True) for v in (names[j], f"{q:.6f}")]
        ranked = [""] * 2 * k if error else ranked
        marked = [str(review[i]).lower()] if calibrated else []
        rows.append([str(path), error, *marked, *ranked])
    write_csv(out, ["path", "error", *(["review"] if calibrated else []), *ranked_header], rows)
    failed = sum(bool(e) for e in errors)
    log.info("predicted %d image(s), %d unreadable", len(paths) - failed, failed)
    print(f"predictions: {out}  ({len(paths) - failed} images, {failed} unreadable)")
    if calibrated:
        report_review(calibrated, review, failed)
    return out


def needs_review(top1: torch.Tensor, errors: list[str], threshold: float | None) -> list[bool]:
    """True where the calibrated top-1 probability is below the threshold, the image is unreadable, or no
    threshold reached the target (then nothing may be tagged without a person)."""
    return [bool(e) or threshold is None or p < threshold for p, e in zip(top1.tolist(), errors, strict=True)]


def report_review(calibrated: dict, review: list[bool], failed: int) -> None:
    marked = sum(review)
    target = f"{calibrated['target']:.1%}"
    if calibrated["threshold"] is None:
        why = calibrated.get("threshold_warning")  # eval.py's reason; files without one had no threshold
        why = why or f"no confidence threshold reached {target} accuracy on val"
        line = f"review: all {marked} rows marked: {why}"
    else:
        line = (
            f"review: {marked} of {len(review)} rows marked (calibrated top-1 probability below "
            f"{calibrated['threshold']:.6f}, the threshold for {target} accuracy on val"
            + (f"; {failed} unreadable" if failed else "")
            + f"), {len(review) - marked} accepted"
        )
    print(line)
