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
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import THREADS
from bench.calib import trained_checkpoint
from bench.table import checkpoint_section_main
from skuvision.assembly import build_trainer, data_module, from_checkpoint
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

REFERENCE_IMAGES = 3000  # eval.py's default unknown_reference
REFERENCE_SIZES = (1000, 3000, 10000)  # kNN (k = 1) AUROC against the reference's size
SAMPLE_SEEDS = (42, 1, 2)  # eval.py's seed, then two other samples of each size


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
    reference = Reference(reference_features(trainer, module, datamodule, REFERENCE_IMAGES, 42).numpy(), "")
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
    results["_sizes"] = by_reference_size(trainer, module, test.features, other_images.features)
    return results


def by_reference_size(trainer, module, known: torch.Tensor, other: torch.Tensor) -> dict:
    """{size: ([separation of kNN, k = 1, per sample seed], seconds to embed the first sample)} for
    REFERENCE_SIZES training images sampled from the whole training split (a --quick checkpoint's data
    subset left out), with SAMPLE_SEEDS (eval.py's seed first) to show how much the sample itself moves it."""
    catalogue = data_module({**module.hparams.data, "subset": None}, module.input_config, "train")
    catalogue.prepare_data()
    catalogue.setup("predict")
    out = {}
    for size in REFERENCE_SIZES:
        found, seconds = [], None
        for seed in SAMPLE_SEEDS:
            started = time.perf_counter()
            reference = Reference(reference_features(trainer, module, catalogue, size, seed).numpy(), "")
            seconds = seconds or time.perf_counter() - started
            found.append(separation(*(scores("knn", None, f, reference, 1) for f in (known, other))))
        out[size] = (found, seconds)
    return out


def eval_seconds(ckpt: str, workdir: Path) -> dict:
    """eval.py's wall time on the checkpoint with the default unknown-product score (kNN over a reference
    of unknown_reference training images, a val pass for the threshold) and with unknown_method=null."""
    from skuvision.tasks.evaluate import evaluate

    seconds = {}
    for name, extra in (("null", ["unknown_method=null"]), ("knn", [])):
        overrides = [f"ckpt_path={ckpt}", f"threads={THREADS}", "gallery=false", *extra]
        started = time.perf_counter()
        report = evaluate(compose_config("eval", overrides, workdir / f"eval-{name}"))
        seconds[name] = (time.perf_counter() - started, report.get("unknown", {}).get("reference_images"))
    return seconds


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
    largest = results["_sizes"][REFERENCE_SIZES[-1]][0][0]
    for size, (found, seconds) in results["_sizes"].items():
        r, others = found[0], ", ".join(f"{o['auroc']:.4f} / {o['fpr_at_95_tpr']:.4f}" for o in found[1:])
        rows.append(
            (
                f"unknown products, kNN k = 1 over {size} training images: AUROC / FPR@95TPR (embedding s)",
                f"{r['auroc']:.4f} / {r['fpr_at_95_tpr']:.4f} ({seconds:.1f} s); other samples {others}",
                f"{largest['auroc']:.4f} / {largest['fpr_at_95_tpr']:.4f} ({REFERENCE_SIZES[-1]} images)",
                f"{r['auroc'] - largest['auroc']:+.4f} AUROC",
                "higher AUROC, lower FPR",
            )
        )
    cost = eval_seconds(ckpt, workdir)
    rows.append(
        (
            f"eval.py wall time, unknown_method=knn (reference of {cost['knn'][1]} images) vs null",
            f"{cost['knn'][0]:.1f} s",
            f"{cost['null'][0]:.1f} s (unknown_method=null)",
            f"{cost['knn'][0] / cost['null'][0]:.2f}x",
            "lower is better",
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
