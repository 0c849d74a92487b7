"""predict.py split= bench: images/s of `predict.py split=train` over a split of litdata shards and over the
image folder it was written from, each beside `predict.py input=` on the same photos as files (a list file
of the split's paths), and the split of shards in Parquet shards (shards=true, what each of several
processes runs) beside one pass. Whole calls of the task, in-process (checkpoint load, Trainer, CSV and
gallery included), one process, alternating repeats, median.

python -m bench.predict_split [--quick]
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
from PIL import Image

from bench import THREADS
from bench.table import run_section
from skuvision.config import compose_config

MODEL = ["model=resnet18", "model.pretrained=false", "input.image_size=128"]
BATCH = 32


def write_photos(root: Path, count: int, seed: int = 0) -> Path:
    """Product-like JPEGs of 400-600 px a side (a coloured blob on a light, noisy background), 3 classes."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = rng.integers(400, 601, size=2)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        blob = np.exp(-(((xx - w / 2) / (w / 3)) ** 2 + ((yy - h / 2) / (h / 3)) ** 2))
        colour = np.array([(60, 90, 200), (200, 80, 60), (70, 180, 90)][i % 3], np.float32)
        image = 235 - blob[..., None] * (235 - colour) + rng.normal(0, 6, size=(h, w, 1))
        folder = root / f"class_{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.jpg", quality=90)
    return root


def trained(workdir: Path, photos: Path) -> Path:
    from skuvision.tasks.train import train

    overrides = [
        "data=image_folder",
        f"data.root={photos}",
        "data.num_workers=0",
        *MODEL,
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.precision=32",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        f"threads={THREADS}",
    ]
    train(compose_config("train", overrides, workdir / "train"))
    return next((workdir / "train" / "checkpoints").glob("best-*.ckpt"))


def timed(workdir: Path, name: str, overrides: list[str]) -> tuple[float, int]:
    """Seconds of one predict call into a new run folder, and its rows."""
    from skuvision.tasks.predict import predict

    run = workdir / "runs" / f"{name}-{time.monotonic_ns()}"
    started = time.perf_counter()
    out = predict(compose_config("predict", overrides, run))
    seconds = time.perf_counter() - started
    return seconds, len(out.read_text().splitlines()) - 1


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    from skuvision.assembly import data_module, load_classifier
    from skuvision.tasks.shard import shard

    count, repeats = (60, 1) if quick else (300, 3)
    photos = write_photos(workdir / "photos", count)
    ckpt = trained(workdir, photos)
    shards = workdir / "shards"
    shard(
        compose_config(
            "shard",
            ["data=image_folder", f"data.root={photos}", *MODEL, f"output={shards}", "workers=1"],
            workdir / "shard_run",
        )
    )
    module = load_classifier(ckpt)
    files = data_module(module.hparams.data, module.input_config, "train")
    files.setup("predict")
    listing = workdir / "train.txt"
    listing.write_text("\n".join(files.sample_paths("train")) + "\n")
    common = [f"ckpt_path={ckpt}", "trainer.accelerator=cpu", "trainer.precision=32", f"threads={THREADS}"]
    common += [f"batch_size={BATCH}", "num_workers=0", "gallery=false"]
    streaming = ["split=train", "data=streaming", f"data.root={shards}", "data.num_workers=0"]
    sides = {
        "input": [*common, f"input={listing}"],
        "folder": [*common, "split=train"],
        "stream": [*common, *streaming],
        "stream_shards": [*common, *streaming, "shards=true", "shard_size=64"],
    }
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    images = {}
    for _ in range(repeats):
        for name, overrides in sides.items():
            took, images[name] = timed(workdir, name, overrides)
            seconds[name].append(took)
    if len(set(images.values())) != 1:
        raise RuntimeError(f"the sides predicted different numbers of images: {images}")
    n = images["input"]
    rate = {name: n / statistics.median(s) for name, s in seconds.items()}
    rows = [
        (
            f"`predict.py split=train` of litdata shards, {n} images, resnet18 at 128 px, one process",
            f"{rate['stream']:.1f} img/s",
            f"{rate['input']:.1f} img/s (`input=` the same photos as files)",
            f"{rate['stream'] / rate['input']:.2f}x",
            "",
        ),
        (
            "`predict.py split=train` of the image folder (its files)",
            f"{rate['folder']:.1f} img/s",
            f"{rate['input']:.1f} img/s (`input=` the same files)",
            f"{rate['folder'] / rate['input']:.2f}x",
            "~1x",
        ),
        (
            "the litdata split in Parquet shards (`shards=true`, each process's path)",
            f"{rate['stream_shards']:.1f} img/s",
            f"{rate['stream']:.1f} img/s (one pass)",
            f"{rate['stream_shards'] / rate['stream']:.2f}x",
            "~1x",
        ),
    ]
    notes = [
        f"{count} generated JPEGs of 400-600 px (quality 90), split train/val/test by the image folder's "
        f"fractions; shards stored by shard.py for resnet18 at 128 px; batch {BATCH}, num_workers=0, "
        f"{THREADS} torch threads, float32, no gallery; whole predict calls, median of {repeats}.",
    ]
    return rows, notes


def main() -> None:
    run_section(bench_rows, __doc__.splitlines()[0], "60 photos, one repeat")


if __name__ == "__main__":
    main()
