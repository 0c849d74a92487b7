"""Confidence for auto-tagging on real Fashion-MNIST: eval.py's temperature scaling against the uncalibrated
model (T = 1) of the same checkpoint, and the 99 % threshold chosen on val, measured on test.

The checkpoint: SKUVISION_BENCH_CKPT (or --ckpt) when set, e.g. the make train recipe's best checkpoint;
otherwise this trains one (the make train recipe; --quick: one epoch on a 3000-image subset).

    python -m bench.calib [--quick] [--ckpt outputs/.../checkpoints/best-....ckpt]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import THREADS
from bench.table import checkpoint_section_main
from skuvision.config import compose_config
from skuvision.tasks.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.99


def trained_checkpoint(workdir: Path, quick: bool) -> Path:
    run_dir = workdir / "calib-recipe"
    shorter = ["trainer.max_epochs=1", "data.subset=3000"] if quick else []
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            f"threads={THREADS}",
            "callbacks.progress_bar=null",
            "data.download=false",
            *shorter,
            f"hydra.run.dir={run_dir}",
        ],
        check=True,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
    )
    return sorted((run_dir / "checkpoints").glob("best-*.ckpt"))[-1]


def bench_rows(
    workdir: Path, quick: bool = False, ckpt_path: str | None = None
) -> tuple[list[tuple], list[str]]:
    ckpt = ckpt_path or os.environ.get("SKUVISION_BENCH_CKPT") or trained_checkpoint(workdir, quick)
    overrides = [f"ckpt_path={ckpt}", f"threads={THREADS}", f"target_precision={TARGET}"]
    report = evaluate(compose_config("eval", overrides, workdir / "calib-eval"))
    tta = json.loads((workdir / "calib-eval" / "metrics.json").read_text())["tta"]
    c = report["calibration"]
    if "skipped" in c:
        return [], [f"calibration skipped: {c['skipped']}"]
    rows = [
        (
            f"test {name}, temperature scaling fitted on val ({c['val_images']} images)",
            f"{c[f'test_{key}_after']:.4f} (T = {c['temperature']:.3f})",
            f"{c[f'test_{key}_before']:.4f} (same checkpoint, T = 1)",
            f"{c[f'test_{key}_after'] / c[f'test_{key}_before']:.2f}x",
            "lower",
        )
        for name, key in (("ECE (15 bins)", "ece"), ("NLL", "nll"))
    ]
    notes = [
        f"Calibration: checkpoint {ckpt}; test accuracy {100 * report['test/acc']:.2f} %, "
        f"{c['test_images']} test images, TTA {tta} (as trained)."
    ]
    if c["threshold"] is None:
        notes.append(f"no threshold reaches {TARGET:.0%} on val: {c['threshold_warning']}")
        return rows, notes
    test_acc = c["test_accuracy_at_threshold"]
    rows.append(
        (
            f"auto-tagging at the {TARGET:.0%} threshold chosen on val: test accuracy of the accepted",
            f"{100 * test_acc:.2f} % ({100 * c['test_coverage']:.1f} % of test accepted)"
            if test_acc is not None
            else "none accepted",
            f"{100 * TARGET:.0f} % (target; val: {100 * c['val_accuracy_at_threshold']:.2f} % on "
            f"{100 * c['val_coverage']:.1f} %)",
            f"{100 * (test_acc - TARGET):+.2f} points" if test_acc is not None else "",
            "within 1 point",
        )
    )
    notes.append(
        f"Threshold {c['threshold']:.6f} on the calibrated top-1 probability, the lowest at which the "
        f"accepted val images reach {TARGET:.0%}; measured once on test."
    )
    if c["threshold_warning"]:
        notes.append(c["threshold_warning"])
    return rows, notes


def main() -> None:
    checkpoint_section_main(__doc__, bench_rows, "calib")


if __name__ == "__main__":
    main()
