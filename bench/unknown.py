"""Unknown products on real Fashion-MNIST: how well each unknown score (skuvision.unknown) tells images of
another data set, sklearn's digits (8 x 8, upscaled to 28 px), from the test split. kNN distance to the
training embeddings, energy and max softmax probability (the usual baseline) side by side, from the same
checkpoint and the same forward passes: AUROC and FPR at 95 % TPR (the share of digits kept when 95 % of test
images are).

The checkpoint: SKUVISION_BENCH_CKPT (or --ckpt) when set; otherwise this trains the make train recipe
(--quick: one epoch on a 3000-image subset), as bench.calib does.

    python -m bench.unknown [--quick] [--ckpt outputs/.../checkpoints/best-....ckpt]
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import THREADS
from bench.calib import trained_checkpoint
from bench.table import checkpoint_section_main
from skuvision.assembly import build_trainer, from_checkpoint
from skuvision.config import compose_config, set_threads
from skuvision.data.inputs import InputFilesDataModule, collect_inputs
from skuvision.features import extract
from skuvision.unknown import (
    Reference,
    label_logits,
    reference_features,
    scores,
    separation,
)

REFERENCE_IMAGES = 10000  # eval.py's default unknown_reference


def write_digits(folder: Path, size: int = 28) -> Path:
    """sklearn's 1,797 digits as grey PNGs, upscaled from 8 x 8 (values 0-16) to `size`."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(load_digits().images):
        pixels = np.clip(image * 16, 0, 255).astype(np.uint8)
        Image.fromarray(pixels, mode="L").resize((size, size), Image.Resampling.BILINEAR).save(
            folder / f"digit_{i:04d}.png"
        )
    return folder


def measured(ckpt: str, workdir: Path, quick: bool) -> dict:
    """{score name: separation(test, digits)} of one checkpoint."""
    set_threads(THREADS)
    cfg = compose_config("eval", [f"ckpt_path={ckpt}", f"threads={THREADS}"], workdir / "eval")
    module, datamodule = from_checkpoint(ckpt, None, split="test")
    trainer = build_trainer(cfg, [], enable_checkpointing=False)
    test = extract(trainer, module, datamodule, logits=True)
    reference = Reference(
        reference_features(trainer, module, datamodule, 3000 if quick else REFERENCE_IMAGES, 42).numpy(), ""
    )
    digits = collect_inputs(str(write_digits(workdir / "digits")))
    files = InputFilesDataModule(digits, module.input_config, 256, 0)
    other_images = extract(trainer, module, files, logits=True)
    heads = module.heads
    results = {}
    for name, method, k in (
        ("kNN distance, k = 1", "knn", 1),
        ("kNN distance, k = 10", "knn", 10),
        ("energy", "energy", 1),
        ("max softmax probability", "msp", 1),
    ):
        known = scores(method, label_logits(test.logits, heads), test.features, reference, k)
        other = scores(method, label_logits(other_images.logits, heads), other_images.features, reference, k)
        results[name] = separation(known, other)
    results["_reference_images"] = len(reference.features)
    return results


def bench_rows(workdir: Path, quick: bool = False, ckpt_path: str | None = None):
    ckpt = ckpt_path or os.environ.get("SKUVISION_BENCH_CKPT") or str(trained_checkpoint(workdir, quick))
    with torch.inference_mode():
        results = measured(ckpt, workdir, quick)
    baseline = results["max softmax probability"]
    rows = []
    for name in ("kNN distance, k = 1", "kNN distance, k = 10", "energy"):
        r = results[name]
        rows.append(
            (
                f"unknown products, {name}: AUROC / FPR@95TPR, Fashion-MNIST test vs digits",
                f"{r['auroc']:.4f} / {r['fpr_at_95_tpr']:.4f}",
                f"{baseline['auroc']:.4f} / {baseline['fpr_at_95_tpr']:.4f} (max softmax probability)",
                f"{r['auroc'] - baseline['auroc']:+.4f} AUROC",
                "higher AUROC, lower FPR",
            )
        )
    notes = [
        f"Unknown products: checkpoint {ckpt}; {baseline['known_images']} test images against "
        f"{baseline['other_images']} sklearn digits upscaled to 28 px; kNN over "
        f"{results['_reference_images']} training embeddings (eval.py's unknown_reference sample)."
    ]
    return rows, notes


def main() -> None:
    checkpoint_section_main(__doc__, bench_rows, "unknown")


if __name__ == "__main__":
    main()
