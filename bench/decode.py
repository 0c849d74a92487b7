"""Bench rows: how fast skuvision's file path feeds product photos, against torchvision's ImageFolder.

Generated photo-like JPEGs (1000-1600 px, random sizes and aspect ratios, quality 90: catalogue shots of one
product on a studio background, and a noisy worst case) in class-folder trees, read at timm's 224 px eval
geometry with the same DataLoader workers and batch size on both sides: skuvision's training loader uncached
(reduced-scale JPEG decoding) and with the decoded-image cache (after a first run filled it), and
torchvision's `datasets.ImageFolder` with Resize(256)/CenterCrop(224)/ToTensor/Normalize. Each figure is the
median of alternating repeats of one epoch after a warm-up epoch (persistent workers on both sides);
skuvision's figures include its batched normalization step, which the reference does per image in the
workers.

The GPU rows (bench/gpu.py) reuse `photo_folder` and `skuvision_module`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from bench import THREADS, images_per_second
from bench.table import print_section

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


def photo(seed: int, style: str = "catalogue") -> Image.Image:
    """A generated RGB photo, 1000-1600 px per side. "catalogue": what shop photos mostly are, one product
    on a studio background (a near-white sweep with soft falloff), the product shaded, printed with a
    stripe or check pattern, a soft shadow, and light sensor noise. "noisy": colour gradients and hard-edged
    shapes under heavy noise, a worst case that costs the JPEG decoder about twice the bytes per pixel."""
    rng = np.random.default_rng(seed)
    width, height = (int(v) for v in rng.integers(1000, 1601, size=2))
    if style == "noisy":
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
    if style != "catalogue":
        raise ValueError(f"style={style!r}: catalogue or noisy")
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    top, bottom = rng.uniform(238, 255), rng.uniform(212, 238)
    background = top + (bottom - top) * (y / height) ** 1.5  # the studio sweep darkens towards the floor
    # The product: a soft-edged ellipse or box over 35-70 % of each side, shaded from one side.
    cx, cy = width * rng.uniform(0.4, 0.6), height * rng.uniform(0.4, 0.6)
    rx, ry = width * rng.uniform(0.18, 0.35), height * rng.uniform(0.18, 0.35)
    mask = Image.new("L", (width, height), 0)
    box = (cx - rx, cy - ry, cx + rx, cy + ry)
    (ImageDraw.Draw(mask).ellipse if rng.random() < 0.5 else ImageDraw.Draw(mask).rectangle)(box, fill=255)
    mask = np.asarray(mask.filter(ImageFilter.GaussianBlur(2)), dtype=np.float32)[..., None] / 255
    small = Image.new("L", (width // 8, height // 8), 0)  # the shadow, blurred at 1/8 size: it is soft
    ImageDraw.Draw(small).ellipse(tuple(v / 8 for v in (cx - rx, cy + 0.8 * ry, cx + rx, cy + 1.15 * ry)), 60)
    shadow = small.filter(ImageFilter.GaussianBlur(3)).resize((width, height), Image.BILINEAR)
    shadow = np.asarray(shadow, dtype=np.float32)
    colour = rng.uniform(20, 230, size=3).astype(np.float32)
    shading = 1 + 0.25 * ((x - cx) / rx * np.cos(rng.uniform(0, 6.3)) + (y - cy) / ry * 0.5)
    # Stripes sin(u x + v y), from 1-D sines and cosines: cheap at full size.
    angle, period = rng.uniform(0, np.pi), rng.uniform(12, 60)
    u, v = 2 * np.pi * np.cos(angle) / period, 2 * np.pi * np.sin(angle) / period
    stripes = np.sin(u * x) * np.cos(v * y) + np.cos(u * x) * np.sin(v * y)
    if rng.random() < 0.5:  # checks rather than stripes: times sin(v x - u y)
        stripes *= np.sin(v * x) * np.cos(u * y) - np.cos(v * x) * np.sin(u * y)
    weave = rng.normal(0, rng.uniform(2, 5), size=(height, width)).astype(np.float32)  # fabric grain
    product = colour * shading[..., None] + (rng.uniform(8, 30) * stripes + weave)[..., None]
    pixels = (background - shadow)[..., None] * (1 - mask) + product * mask
    pixels += rng.normal(0, 1.5, size=(height, width, 1)).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def photo_folder(workdir: Path, count: int, threads: int = THREADS, style: str = "catalogue") -> Path:
    """`count` generated JPEGs under workdir/photos_<style>_<count>/<class>/, written once and reused."""
    root = Path(workdir) / f"photos_{style}_{count}"
    done = root / ".complete"
    if done.is_file():
        return root

    def write(i: int) -> None:
        folder = root / CLASSES[i % len(CLASSES)]
        folder.mkdir(parents=True, exist_ok=True)
        photo(i, style).save(folder / f"{i:05d}.jpg", quality=90)

    with ThreadPoolExecutor(max_workers=max(2, threads)) as pool:
        list(pool.map(write, range(count)))
    done.touch()
    return root


def reference_loader(root: Path, batch: int = BATCH, workers: int = WORKERS) -> DataLoader:
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
    return DataLoader(
        dataset,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        persistent_workers=True,
        pin_memory=torch.cuda.is_available(),
    )


def skuvision_module(root: Path, cache: bool, batch: int = BATCH, workers: int = WORKERS, decode_on="cpu"):
    from skuvision.data.image_folder import ImageFolderDataModule

    module = ImageFolderDataModule(
        str(root),
        INPUT_CONFIG,
        split_fractions=(1, 0, 0),
        batch_size=batch,
        eval_batch_size=batch,
        num_workers=workers,
        cache=cache,
        decode_on=decode_on,
    )
    module.setup()
    return module


@contextlib.contextmanager
def own_cache_folder(parent: Path):
    """SKUVISION_CACHE set to a new folder under `parent` meanwhile: a fill is measured from empty, and the
    user's cache is left alone."""
    user_cache = os.environ.get("SKUVISION_CACHE")
    os.environ["SKUVISION_CACHE"] = tempfile.mkdtemp(prefix="cache_", dir=parent)
    try:
        yield
    finally:
        if user_cache is None:
            del os.environ["SKUVISION_CACHE"]
        else:
            os.environ["SKUVISION_CACHE"] = user_cache


def bytes_per_pixel(root: Path) -> float:
    files = sorted(root.rglob("*.jpg"))
    pixels = 0
    for path in files:
        with Image.open(path) as img:
            pixels += img.width * img.height
    return sum(f.stat().st_size for f in files) / pixels


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    count = 200 if quick else 1000
    repeats = 2 if quick else 3
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    root = photo_folder(workdir, count)
    noisy_root = photo_folder(workdir, count, style="noisy")
    generated = time.perf_counter() - started
    with own_cache_folder(workdir):
        started = time.perf_counter()
        uncached = skuvision_module(root, cache=False)  # includes the one-time scan for unreadable files
        scan_s = time.perf_counter() - started
        started = time.perf_counter()
        cached = skuvision_module(root, cache=True)
        fill_s = time.perf_counter() - started
        noisy = skuvision_module(noisy_root, cache=False)

    loaders = {
        "reference": (reference_loader(root), None),
        "uncached": (uncached.train_dataloader(), uncached.to_model_input),
        "cached": (cached.train_dataloader(), cached.to_model_input),
        "noisy reference": (reference_loader(noisy_root), None),
        "noisy uncached": (noisy.train_dataloader(), noisy.to_model_input),
    }
    figures: dict[str, list[float]] = {name: [] for name in loaders}
    for loader, per_batch in loaders.values():
        images_per_second(loader, per_batch)  # warm-up: worker start, page cache
    for _ in range(repeats):
        for name, (loader, per_batch) in loaders.items():
            figures[name].append(images_per_second(loader, per_batch))
    rate = {name: statistics.median(values) for name, values in figures.items()}
    density = {"catalogue": bytes_per_pixel(root), "noisy": bytes_per_pixel(noisy_root)}

    def reference(name):
        return f"{rate[name]:.0f} img/s (torchvision ImageFolder, Resize/CenterCrop/ToTensor/Normalize)"

    setting = f"{count} JPEGs 1000-1600 px -> {IMAGE_SIZE} px, {WORKERS} workers, batch {BATCH}"
    catalogue = f"catalogue photos, {density['catalogue']:.2f} B/px"
    rows = [
        (
            f"file path, uncached ({catalogue}; {setting})",
            f"{rate['uncached']:.0f} img/s",
            reference("reference"),
            f"{rate['uncached'] / rate['reference']:.2f}x",
            ">= 2x and >= 400 img/s",
        ),
        (
            f"file path, data.cache=true, after the fill ({catalogue}; {setting})",
            f"{rate['cached']:.0f} img/s",
            reference("reference"),
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
        (
            f"file path, uncached, worst case (noisy photos, {density['noisy']:.2f} B/px; {setting})",
            f"{rate['noisy uncached']:.0f} img/s",
            reference("noisy reference"),
            f"{rate['noisy uncached'] / rate['noisy reference']:.2f}x",
            "",
        ),
    ]
    notes = [
        f"decode bench: {count} generated photos of each kind ({generated:.0f} s to write, reused next "
        "time); "
        f"setup scan for unreadable files {scan_s:.1f} s once per folder (cached by size and mtime); "
        f"medians of {repeats} alternating epochs after a warm-up; {THREADS} torch threads in the main "
        "process",
        "decode bench: catalogue photos are one shaded, patterned product on a near-white studio background "
        "with light noise (bench/decode.py `photo`); the noisy ones carry heavy noise over the whole frame, "
        "which roughly doubles the entropy-coded bytes the decoder must read at any scale",
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
