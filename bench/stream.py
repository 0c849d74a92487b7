"""Streaming bench: generated 1000-1600 px product JPEGs at 224 px (resnet50's input), read as litdata shards
written by shard.py, beside torchvision's ImageFolder with Resize/CenterCrop/ToTensor/Normalize on the
same photos, with the same workers and batch size. Alternating repeats, median.

python -m bench.stream [--quick]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import THREADS, images_per_second
from bench.table import run_section
from skuvision.config import compose_config
from skuvision.data import StreamingDataModule
from skuvision.models.input_config import resolve_input
from skuvision.tasks.shard import shard

ROOT = Path(__file__).resolve().parents[1]
torch.set_num_threads(THREADS)
BATCH = 64


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """Product-like JPEGs: a smooth coloured object on a light background with noise, 1000-1600 px a side,
    quality 90, in 4 class folders."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = rng.integers(1000, 1601, size=2)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        blob = np.exp(-(((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2))
        colour = rng.integers(0, 256, size=3).astype(np.float32)
        image = 235 - blob[..., None] * (235 - colour) + rng.normal(0, 6, size=(h, w, 1))
        folder = root / f"class_{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    from torchvision import datasets, transforms

    count, repeats = (96, 1) if quick else (1000, 3)
    photos = write_photos(workdir / "photos", count)
    shards = workdir / "shards"
    overrides = [
        "data=image_folder",
        f"data.root={photos}",
        "data.split_fractions=[1,0,0]",  # every photo in train: one pass reads them all
        "model=resnet50",
        f"output={shards}",
        f"workers={THREADS}",
        f"threads={THREADS}",
    ]
    started = time.perf_counter()
    shard(compose_config("shard", overrides, workdir / "shard_run"))
    shard_rate = count / (time.perf_counter() - started)

    model_input = resolve_input({"name": "resnet50", "pretrained": False}, 3)
    datamodule = StreamingDataModule(
        str(shards), model_input, batch_size=BATCH, num_workers=THREADS, cache_dir=str(workdir / "cache")
    )
    datamodule.setup("fit")
    streamed = datamodule.train_dataloader

    size = model_input["input_size"][-1]
    reference = datasets.ImageFolder(
        str(photos),
        transform=transforms.Compose(
            [
                transforms.Resize(int(size / model_input["crop_pct"])),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize(model_input["mean"], model_input["std"]),
            ]
        ),
    )
    reference_loader = torch.utils.data.DataLoader(
        reference, batch_size=BATCH, shuffle=True, num_workers=THREADS
    )
    results: dict[str, list[float]] = {"streaming": [], "reference": []}
    for _ in range(repeats):
        results["streaming"].append(images_per_second(streamed(), datamodule.to_model_input))
        results["reference"].append(images_per_second(reference_loader))
    stream_rate, reference_rate = (statistics.median(v) for v in results.values())
    stored = int(size / model_input["crop_pct"])
    rows = [
        (
            f"streaming path, train loader ({size} px, {THREADS} workers)",
            f"{stream_rate:.0f} img/s",
            f"{reference_rate:.0f} img/s (torchvision ImageFolder, Resize/CenterCrop/ToTensor/Normalize)",
            f"{stream_rate / reference_rate:.2f}x",
            "> 1x",
        ),
        (
            "shard.py, written once (decode + resize + JPEG)",
            f"{shard_rate:.0f} img/s",
            f"{reference_rate:.0f} img/s (the reference's epoch, which decodes the same photos)",
            f"{shard_rate / reference_rate:.2f}x",
            "one epoch's cost",
        ),
    ]
    notes = [
        f"{count} generated JPEGs of 1000-1600 px (quality 90); shards stored at {stored} px, JPEG "
        f"quality 90, in a local folder; batch {BATCH}, {THREADS} workers, {THREADS} torch threads, "
        f"median of {repeats}.",
        "Streaming figures include each epoch's worker start-up: the loader is not persistent, so that "
        "litdata reshuffles every epoch. shard.py's figure includes the unreadable-file scan (each photo "
        "decoded at 1/8 scale, cached for later runs) and litdata's worker start-up.",
    ]
    return rows, notes


def main() -> None:
    run_section(bench_rows, __doc__.splitlines()[0], "96 photos instead of 1000")


if __name__ == "__main__":
    main()
