"""Bench rows on a CUDA GPU: ResNet-50 training through skuvision's Trainer against a plain PyTorch loop, the
precision, memory-format, cuDNN-autotune and one-GPU DDP variants, and product-photo JPEGs fed to the GPU
(decoded in CPU workers, decoded on the device, or read from the decoded-image cache), alone and feeding
ResNet-50 training. Skipped, with a note, where no CUDA device exists.

    python -m bench.gpu [--quick] [--workers 12]

Each training figure is img/s over the timed steps of one epoch (warm-up steps left out, the device
synchronized at both ends of the timed span).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from bench import images_per_second
from bench.table import print_section


def batch_for(device: str) -> int:
    """256 on a GPU; 16 in a CPU code-path check, where ResNet-50 steps at 256 would take minutes."""
    return 256 if device == "cuda" else 16


def _run_module():
    from bench import run  # the step timers the CPU rows use

    return run


def peak_memory_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def training_rate(kind: str, data_root: Path, steps: int, warmup: int, device: str, workdir: Path, extra=()):
    """(img/s, peak GiB) of ResNet-50 at 224 px, batch 256: kind "skuvision" (the Trainer) or "raw"."""
    run = _run_module()
    extra = [f"data.batch_size={batch_for(device)}", *extra]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    step = run.skuvision_steps if kind == "skuvision" else run.raw_steps
    rate = step("resnet50", 224, data_root, steps, warmup, device, workdir, extra)
    return rate, peak_memory_gib()


def step_rows(
    data_root: Path, steps: int, warmup: int, repeats: int, device, workdir, rows, notes, only=None
):
    ours, raw = [], []
    for _ in range(repeats):  # alternating, so drifts hit both sides
        raw.append(training_rate("raw", data_root, steps, warmup, device, workdir)[0])
        ours.append(training_rate("skuvision", data_root, steps, warmup, device, workdir)[0])
    ratios = [o / r for o, r in zip(ours, raw, strict=True)]
    base = statistics.median(ours)
    rows.append(
        (
            f"ResNet-50 @ 224 px train steps, batch {batch_for(device)}, bf16-mixed + channels_last "
            f"({device}): img/s",
            f"{base:.0f}",
            f"{statistics.median(raw):.0f} (plain PyTorch loop)",
            f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})",
            ">= 0.97",
        )
    )
    variants = [
        ("weight EMA off (callbacks.ema=null)", ["callbacks.ema=null"]),
        ("channels_last off (model.channels_last=false)", ["model.channels_last=false"]),
        ("float32 (trainer.precision=32)", ["trainer.precision=32"]),
        ("cuDNN autotune (trainer.benchmark=true)", ["trainer.benchmark=true"]),
        ("DDP, one GPU (trainer.strategy=ddp)", ["trainer.strategy=ddp"]),
    ]
    for label, extra in variants:
        if only is not None and not any(o in label for o in only):
            continue
        try:
            rate, memory = training_rate("skuvision", data_root, steps, warmup, device, workdir, extra)
        except Exception as err:  # one variant failing must not lose the others' figures
            traceback.print_exc()
            rows.append((f"ResNet-50 {label}", f"failed: {type(err).__name__}: {err}"[:160], "", "", ""))
            continue
        rows.append(
            (
                f"ResNet-50 @ 224 px, skuvision, {label}: img/s (peak GPU memory)",
                f"{rate:.0f} ({memory:.1f} GiB)",
                f"{base:.0f} (skuvision default: bf16-mixed, channels_last, one process)",
                f"{rate / base:.2f}x",
                "",
            )
        )
    notes.append(
        f"GPU steps: {steps} timed steps after {warmup} warm-up steps of one epoch, Fashion-MNIST in memory "
        "resized to 224 px on the device; the plain loop uses the same timm model, optimizer groups, "
        "one-cycle schedule, bf16 autocast and channels_last"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def photo_loader_rows(photos: Path, count: int, workers: int, repeats: int, device: str, rows, notes):
    """Product photos to normalized 224 px batches on the GPU: four ways, same workers and batch."""
    from bench import decode
    from skuvision.data.decode import JpegBatch, decode_batch_on_device

    cuda = torch.device(device)
    to_gpu = {}

    def module(**kwargs):
        m = decode.skuvision_module(photos, batch=batch_for(device), workers=workers, **kwargs)
        to_gpu[id(m)] = m.to_model_input.to(cuda)
        return m

    def normalized_on_gpu(m):
        to_model_input = to_gpu[id(m)]

        def finish(images):
            if isinstance(images, JpegBatch):  # decoded on the device
                x = decode_batch_on_device(images, cuda, to_model_input.resize_crop, 3)
            else:
                x = images.to(cuda, non_blocking=True)
            x = to_model_input(x)
            sync(cuda)
            return x

        return finish

    def reference_finish(images):
        x = images.to(cuda, non_blocking=True)
        sync(cuda)
        return x

    with decode.own_cache_folder(photos.parent):
        uncached = module(cache=False)
        on_device = module(cache=False, decode_on="gpu")
        started = time.perf_counter()
        cached = module(cache=True)
        fill_s = time.perf_counter() - started
    loaders = {
        "reference": (decode.reference_loader(photos, batch_for(device), workers), reference_finish),
        "cpu": (uncached.train_dataloader(), normalized_on_gpu(uncached)),
        "gpu": (on_device.train_dataloader(), normalized_on_gpu(on_device)),
        "cached": (cached.train_dataloader(), normalized_on_gpu(cached)),
    }
    figures = {name: [] for name in loaders}
    for loader, finish in loaders.values():
        images_per_second(loader, finish)  # warm-up: workers, page cache, nvJPEG handles
    for _ in range(repeats):
        for name, (loader, finish) in loaders.items():
            figures[name].append(images_per_second(loader, finish))
    rate = {name: statistics.median(v) for name, v in figures.items()}
    ref = f"{rate['reference']:.0f} (torchvision ImageFolder, {workers} workers)"
    setting = f"{count} JPEGs 1000-1600 px -> 224 px on the GPU, {workers} workers, batch {batch_for(device)}"
    for name, label in (
        ("gpu", "data.decode_on=gpu (nvJPEG batches)"),
        ("cpu", "CPU workers, reduced-scale decoding"),
        ("cached", "data.cache=true, after the fill"),
    ):
        rows.append(
            (
                f"photos, {label} ({setting}): img/s",
                f"{rate[name]:.0f}",
                ref,
                f"{rate[name] / rate['reference']:.2f}x",
                "",
            )
        )
    notes.append(
        f"GPU photos: medians of {repeats} alternating epochs after a warm-up; the cache fill took "
        f"{fill_s:.1f} s for {count} images"
    )


def photo_training_rows(photos: Path, workers: int, steps: int, warmup: int, device, workdir, compute, rows):
    """ResNet-50 training fed from the photo folder: how much of the in-memory rate each data path keeps."""
    run = _run_module()
    common = [
        "data=image_folder",
        f"data.num_workers={workers}",
        "data.split_fractions=[0.9,0.05,0.05]",
        f"data.batch_size={batch_for(device)}",
    ]
    from bench import decode

    for label, extra in (
        ("data.decode_on=gpu", ["data.decode_on=gpu"]),
        ("CPU workers (reduced-scale decoding)", []),
        ("data.cache=true", ["data.cache=true"]),
    ):
        try:
            overrides = common + extra
            with decode.own_cache_folder(workdir):
                rate = run.skuvision_steps("resnet50", 224, photos, steps, warmup, device, workdir, overrides)
        except Exception as err:
            traceback.print_exc()
            rows.append((f"ResNet-50 trained from photos, {label}", f"failed: {err}"[:160], "", "", ""))
            continue
        rows.append(
            (
                f"ResNet-50 @ 224 px trained from {len(list(photos.rglob('*.jpg')))} photo files, {label}, "
                f"{workers} workers, first epoch (worker start-up and prefetch included): img/s",
                f"{rate:.0f}",
                f"{compute:.0f} (same Trainer, images already in GPU memory)",
                f"{rate / compute:.2f}x",
                "",
            )
        )


def bench_rows(
    workdir: Path,
    quick: bool = False,
    workers: int | None = None,
    device: str | None = None,
    sizes: dict | None = None,
    variants: list[str] | None = None,
):
    """(rows, notes). `device="cpu"` runs every part on the CPU at small sizes: a check of this file's
    code paths on a machine without a GPU, not a measurement. `sizes` overrides steps, warmup, repeats,
    photos; `variants` keeps the variant rows whose label holds one of these words."""
    device = device or ("cuda" if torch.cuda.is_available() else None)
    if device is None:
        return [], ["gpu: no CUDA device on this machine; the GPU rows were not measured"]
    run = _run_module()
    from bench import decode

    if device == "cpu":
        quick = True
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    workers = workers or min(12, max(2, (os.cpu_count() or 2) - 2))
    size = {"steps": 10, "warmup": 3, "repeats": 1} if quick else {"steps": 60, "warmup": 10, "repeats": 2}
    size["photos"] = 64 if device == "cpu" else 600 if quick else 4000
    size.update(sizes or {})
    steps, warmup, repeats, count = size["steps"], size["warmup"], size["repeats"], size["photos"]
    data_root = run.locate_fashion(run.ROOT / "data" / "fashion_mnist")
    rows: list[tuple] = []
    name = torch.cuda.get_device_name(0) if device == "cuda" else "none (a code-path check on the CPU)"
    notes = [f"GPU: {name}, torch {torch.__version__}, {os.cpu_count()} CPU cores"]

    def section(name, fn, *args):
        started = time.perf_counter()
        try:
            fn(*args)
        except Exception as err:
            traceback.print_exc()
            notes.append(f"gpu {name}: failed: {type(err).__name__}: {err}")
        print(f"gpu bench: {name} took {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        print_section(rows, notes)  # what is measured so far, in case a later part runs out of time

    section("steps", step_rows, data_root, steps, warmup, repeats, device, workdir, rows, notes, variants)
    started = time.perf_counter()
    photos = decode.photo_folder(workdir, count, threads=max(2, os.cpu_count() or 2))
    notes.append(f"GPU photos: {count} generated in {time.perf_counter() - started:.0f} s")
    section("photo loaders", photo_loader_rows, photos, count, workers, repeats, device, rows, notes)
    compute = next((float(r[1]) for r in rows if r[0].startswith("ResNet-50 @ 224 px train steps")), None)
    if compute:
        # 90 % of the photos train; 3 warm-up steps
        train_steps = min(8, count * 9 // 10 // batch_for(device) - 3)
        args = (photos, workers, train_steps, 3, device, workdir, compute, rows)
        section("photo training", photo_training_rows, *args)
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and photos")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 2)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cpu: check the code paths here (with --quick)")
    for name in ("steps", "warmup", "repeats", "photos"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--variants", default=None, help="comma-separated words of the variant rows to run")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="skuvision-bench-gpu-"))
    sizes = {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "photos") if getattr(args, k)}
    variants = args.variants.split(",") if args.variants else None
    rows, notes = bench_rows(
        workdir, quick=args.quick, workers=args.workers, device=args.device, sizes=sizes, variants=variants
    )
    print_section(rows, notes)


if __name__ == "__main__":
    sys.exit(main())
