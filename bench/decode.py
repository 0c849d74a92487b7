"""Bench rows: how fast skuvision's file path feeds product photos, against torchvision's ImageFolder.

Generated photo-like JPEGs (1000-1600 px, random sizes and aspect ratios, smooth gradients, shapes and noise,
quality 90) in a class-folder tree, read at timm's 224 px eval geometry with the same DataLoader workers and
batch size on both sides: skuvision's training loader uncached (reduced-scale JPEG decoding) and with the
decoded-image cache (after a first run filled it), and torchvision's `datasets.ImageFolder` with
Resize(256)/CenterCrop(224)/ToTensor/Normalize. Each figure is the median of alternating repeats of one
epoch after a warm-up epoch (persistent workers on both sides); skuvision's figures include its batched
normalization step, which the reference does per image in the workers.

Other data paths (streaming) reuse `photo_folder` and `images_per_second` for rows against the same
reference: see `reference_loader`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402
from table import print_section  # noqa: E402  (bench/ is on sys.path)
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets  # noqa: E402
from torchvision import transforms as T  # noqa: E402

IMAGE_SIZE = 224
WORKERS = 2
BATCH = 64
CLASSES = ("bags", "kettles", "shirts", "shoes")
INPUT_CONFIG = {
    "input_size": (3, IMAGE_SIZE, IMAGE_SIZE),
    "interpolation": "bilinear",  # the reference's Resize default
    "crop_pct": 0.875,  # 224 / 0.875 = 256: the reference's Resize(256)
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}


def photo(seed: int) -> Image.Image:
    """A photo-like RGB image, 1000-1600 px per side: smooth colour gradients, a few soft-edged shapes,
    sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(1000, 1601, size=2))
    field = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    img = Image.fromarray(field).resize((width, height), Image.BICUBIC)  # smooth gradients
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(50, width // 2)), y0 + int(rng.integers(50, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    pixels = np.asarray(img, dtype=np.int16)
    pixels += rng.integers(-10, 11, size=(height, width, 1), dtype=np.int16)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_folder(workdir: Path, count: int) -> Path:
    """`count` generated JPEGs under workdir/photos_<count>/<class>/, written once and reused."""
    root = Path(workdir) / f"photos_{count}"
    done = root / ".complete"
    if done.is_file():
        return root

    def write(i: int) -> None:
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        photo(i).save(folder / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=max(2, THREADS)) as pool:
        list(pool.map(write, range(count)))
    done.touch()
    return root


def images_per_second(loader, per_batch=None) -> float:
    """Images per second through one epoch of `loader`, with `per_batch` applied to each batch of images."""
    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        if per_batch is not None:
            images = per_batch(images)
        seen += len(images)
    return seen / (time.perf_counter() - start)


def reference_loader(root: Path) -> DataLoader:
    """torchvision's ImageFolder, the usual per-image pipeline, same workers and batch."""
    transform = T.Compose(
        [
            T.Resize(256),
            T.CenterCrop(IMAGE_SIZE),
            T.ToTensor(),
            T.Normalize(INPUT_CONFIG["mean"], INPUT_CONFIG["std"]),
        ]
    )
    dataset = datasets.ImageFolder(str(root), transform=transform)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=WORKERS, persistent_workers=True)


def skuvision_module(root: Path, cache: bool):
    from skuvision.data.image_folder import ImageFolderDataModule

    module = ImageFolderDataModule(
        str(root),
        INPUT_CONFIG,
        split_fractions=(1, 0, 0),
        batch_size=BATCH,
        eval_batch_size=BATCH,
        num_workers=WORKERS,
        cache=cache,
    )
    module.setup()
    return module


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    count = 200 if quick else 1000
    repeats = 2 if quick else 3
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    root = photo_folder(workdir, count)
    generated = time.perf_counter() - started
    # A cache folder of this bench's own: the fill is measured from empty, and the user's is left alone.
    user_cache = os.environ.get("SKUVISION_CACHE")
    os.environ["SKUVISION_CACHE"] = tempfile.mkdtemp(prefix="cache_", dir=workdir)
    try:
        started = time.perf_counter()
        uncached = skuvision_module(root, cache=False)  # includes the one-time scan for unreadable files
        scan_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = skuvision_module(root, cache=True)
        fill_s = time.perf_counter() - started
    finally:
        if user_cache is None:
            del os.environ["SKUVISION_CACHE"]
        else:
            os.environ["SKUVISION_CACHE"] = user_cache

    loaders = {
        "reference": (reference_loader(root), None),
        "uncached": (uncached.train_dataloader(), uncached.to_model_input),
        "cached": (cached.train_dataloader(), cached.to_model_input),
    }
    figures: dict[str, list[float]] = {name: [] for name in loaders}
    for loader, per_batch in loaders.values():
        images_per_second(loader, per_batch)  # warm-up: worker start, page cache
    for _ in range(repeats):
        for name, (loader, per_batch) in loaders.items():
            figures[name].append(images_per_second(loader, per_batch))
    rate = {name: statistics.median(values) for name, values in figures.items()}
    ref = f"{rate['reference']:.0f} img/s (torchvision ImageFolder, Resize/CenterCrop/ToTensor/Normalize)"
    setting = f"{count} JPEGs 1000-1600 px -> {IMAGE_SIZE} px, {WORKERS} workers, batch {BATCH}"
    rows = [
        (
            f"file path, uncached ({setting})",
            f"{rate['uncached']:.0f} img/s",
            ref,
            f"{rate['uncached'] / rate['reference']:.2f}x",
            ">= 2x and >= 400 img/s",
        ),
        (
            f"file path, data.cache=true, after the fill ({setting})",
            f"{rate['cached']:.0f} img/s",
            ref,
            f"{rate['cached'] / rate['reference']:.2f}x",
            ">= 5x",
        ),
        (
            f"cache fill: the first run decodes and stores {count} images (main process, {WORKERS} threads)",
            f"{fill_s:.1f} s ({count / fill_s:.0f} img/s)",
            f"{count / rate['reference']:.1f} s (one reference epoch)",
            f"{(count / rate['reference']) / fill_s:.2f}x",
            "about one epoch",
        ),
    ]
    notes = [
        f"decode bench: {count} generated photos ({generated:.0f} s to write, reused next time); "
        f"setup scan for unreadable files {scan_s:.1f} s once per folder (cached by size and mtime); "
        f"medians of {repeats} alternating epochs after a warm-up; {THREADS} torch threads in the main "
        "process",
        "decode bench: skuvision decodes JPEGs at a reduced DCT scale (Pillow draft); the cache holds the "
        "final 224 px uint8 crops in memory-mapped shards",
    ]
    return rows, notes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 images instead of 1000")
    parser.add_argument("--workdir", type=Path, default=None, help="where photos are generated (kept)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "skuvision_bench_decode"
    workdir.mkdir(parents=True, exist_ok=True)
    rows, notes = bench_rows(workdir, quick=args.quick)
    print_section(rows, notes)


if __name__ == "__main__":
    sys.exit(main())
