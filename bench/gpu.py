"""Bench rows on CUDA GPUs: ResNet-50 and ViT-B/16 training (bf16 + channels_last, weight EMA on) through
skuvision's Trainer beside a plain PyTorch loop running the same recipe, the precision, memory-format,
cuDNN-autotune, one-GPU DDP and `model.compile=true` variants, DDP on every GPU present beside one GPU
(train.py as users run it), product-photo JPEGs fed to the GPU (decoded in CPU workers, decoded on the
device, or read from the decoded-image cache) alone and feeding ResNet-50 training, and embed.py's feature
pass with GPU decoding beside CPU decoding. Skipped, with a note, where no CUDA device exists.

    python -m bench.gpu [--quick] [--workers 12] [--parts steps,ddp,photos,embed] [--dry-run]

--dry-run prints what a run would measure (models, overrides, commands) and runs nothing: the check of this
file on a machine without a GPU. Each training figure is img/s over the timed steps of one epoch (warm-up
steps left out, the device synchronized at both ends of the timed span); the DDP rows are train.py's own
`fit/train_img_per_s` (metrics.json). Not yet run on a GPU with all these parts: by estimate the steps part
(16 runs, one compile) takes about 4 minutes of one H100/H200 and the others about 4 together; under a time
limit, run them as separate commands with --parts.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
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


# The models of the step rows: (conf/model option, overrides) at 224 px.
ARCHS = {
    "ResNet-50": ("resnet50", []),
    "ViT-B/16": ("timm", ["model.name=vit_base_patch16_224"]),
}
PARTS = ("steps", "ddp", "photos", "embed")


def training_rate(
    kind: str,
    data_root: Path,
    steps: int,
    warmup: int,
    device: str,
    workdir: Path,
    extra=(),
    arch="ResNet-50",
):
    """(img/s, peak GiB) of `arch` at 224 px, batch 256: kind "skuvision" (the Trainer), "raw" (the plain
    loop with the recipe's weight EMA) or "raw_no_ema"."""
    run = _run_module()
    model, arch_extra = ARCHS[arch]
    extra = [f"data.batch_size={batch_for(device)}", *arch_extra, *extra]
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if kind == "skuvision":
        rate = run.skuvision_steps(model, 224, data_root, steps, warmup, device, workdir, extra)
    else:
        rate = run.raw_steps(model, 224, data_root, steps, warmup, device, workdir, extra, ema=kind == "raw")
    return rate, peak_memory_gib()


VARIANTS = [
    ("weight EMA off (callbacks.ema=null)", ["callbacks.ema=null"]),
    ("channels_last off (model.channels_last=false)", ["model.channels_last=false"]),
    ("float32 (trainer.precision=32)", ["trainer.precision=32"]),
    ("cuDNN autotune (trainer.benchmark=true)", ["trainer.benchmark=true"]),
    ("DDP, one GPU (trainer.strategy=ddp)", ["trainer.strategy=ddp"]),
    # Compiling takes the first step (a warm-up step here); the eval-mode graph compiles after the timed span.
    ("torch.compile (model.compile=true)", ["model.compile=true"]),
]


def step_rows(
    data_root: Path, steps: int, warmup: int, repeats: int, device, workdir, rows, notes, only=None
):
    base = None
    for arch in ARCHS:
        ours, raw = [], []
        for _ in range(repeats):  # alternating, so drifts hit both sides
            raw.append(training_rate("raw", data_root, steps, warmup, device, workdir, arch=arch)[0])
            ours.append(training_rate("skuvision", data_root, steps, warmup, device, workdir, arch=arch)[0])
        no_ema = training_rate("raw_no_ema", data_root, steps, warmup, device, workdir, arch=arch)[0]
        ratios = [o / r for o, r in zip(ours, raw, strict=True)]
        base = base or statistics.median(ours)  # ResNet-50's: what the variants compare with
        rows.append(
            (
                f"{arch} @ 224 px train steps, batch {batch_for(device)}, bf16-mixed + channels_last, weight "
                f"EMA on ({device}): img/s",
                f"{statistics.median(ours):.0f}",
                f"{statistics.median(raw):.0f} (plain PyTorch loop, same recipe and EMA)",
                f"{statistics.median(ratios):.3f} ({min(ratios):.2f}-{max(ratios):.2f})",
                ">= 0.97",
            )
        )
        notes.append(
            f"{arch}: the plain loop without its weight EMA ran at {no_ema:.0f} img/s (one run); "
            f"skuvision with the EMA is {statistics.median(ours) / no_ema:.3f} of that"
        )
    for label, extra in VARIANTS:
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
        "resized to 224 px on the device; the plain loop runs the same recipe: timm model, optimizer groups "
        "and fused AdamW, one-cycle schedule, bf16 autocast, channels_last, label smoothing, flip and the "
        "weight EMA (one foreach lerp per step, as skuvision's)"
    )


def ddp_overrides(data_root: Path, processes: int, steps: int, device: str) -> list[str]:
    """train.py's overrides for ResNet-50 on `processes` GPUs (trainer=ddp) or one: batch 256 per GPU."""
    run = _run_module()
    ddp = "trainer=ddp" if device == "cuda" else "trainer=ddp_cpu"  # the CPU: a code-path check
    trainer = [ddp, f"trainer.devices={processes}"] if processes > 1 else ["trainer.devices=1"]
    return run.overrides_for("resnet50", 224, data_root, device) + [
        *trainer,
        f"data.batch_size={batch_for(device) * processes}",
        f"trainer.limit_train_batches={steps}",
        "callbacks.progress_bar=null",
    ]


def ddp_rate(data_root: Path, processes: int, steps: int, device: str, workdir: Path) -> float:
    """Training img/s of `python train.py` (all processes together), from its metrics.json."""
    run_dir = workdir / f"ddp-{processes}"
    overrides = [*ddp_overrides(data_root, processes, steps, device), f"hydra.run.dir={run_dir}"]
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve().parents[1] / "train.py"), *overrides],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode:
        raise RuntimeError(f"train.py with {processes} process(es) failed: {done.stderr[-600:]}")
    return float(json.loads((run_dir / "metrics.json").read_text())["fit/train_img_per_s"])


def ddp_rows(data_root: Path, steps: int, device: str, workdir: Path, rows, notes) -> None:
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    one = ddp_rate(data_root, 1, steps, device, workdir)
    many = ddp_rate(data_root, gpus, steps, device, workdir)
    rows.append(
        (
            f"ResNet-50 @ 224 px, train.py trainer=ddp on {gpus} GPU(s), batch {batch_for(device)} per GPU: "
            "img/s",
            f"{many:.0f}",
            f"{one:.0f} (train.py on one GPU)",
            f"{many / one:.2f}x ({many / one / gpus:.2f} per GPU)",
            f"about {gpus}x",
        )
    )
    notes.append(
        f"DDP rows: train.py as users run it, {steps} steps of one epoch per run, the figure its "
        "fit/train_img_per_s (first steps and cuDNN's warm-up included, validation and start-up not)"
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


def embed_checkpoint(photos: Path, workers: int, device: str, workdir: Path) -> Path:
    """A ResNet-50 checkpoint of the photo folder, trained for 2 steps: embed's speed needs no accuracy."""
    from skuvision.config import compose_config
    from skuvision.tasks.train import train

    run = _run_module()
    overrides = run.overrides_for("resnet50", 224, photos, device) + [
        "data=image_folder",
        f"data.root={photos}",
        f"data.num_workers={workers}",
        "trainer.limit_train_batches=2",
        "callbacks.progress_bar=null",
    ]
    cfg = compose_config("train", overrides, workdir / "embed-ckpt")
    train(cfg)
    return workdir / "embed-ckpt" / "checkpoints" / "last.ckpt"


def embed_rate(checkpoint: Path, decode_on: str, workers: int, device: str, repeats: int) -> tuple:
    """(img/s, images) of embed.py's feature pass (tasks.embed.features_of: decoding, the model, the
    normalized features) over the checkpoint's train split, JPEGs decoded on `decode_on`; the median of
    `repeats` passes after a warm-up pass."""
    from omegaconf import OmegaConf
    from pytorch_lightning import Trainer

    from skuvision.assembly import from_checkpoint
    from skuvision.checkpoints import load_classifier
    from skuvision.tasks.embed import features_of

    data = OmegaConf.create(dict(load_classifier(checkpoint).hparams.data))
    data.decode_on, data.num_workers, data.batch_size = decode_on, workers, batch_for(device)
    module, datamodule = from_checkpoint(checkpoint, data, split="train")
    trainer = Trainer(
        accelerator=device, devices=1, precision="bf16-mixed", logger=False, enable_progress_bar=False
    )
    features_of(trainer, module, datamodule)  # warm-up: workers, page cache, nvJPEG, cuDNN
    rates = []
    for _ in range(repeats):
        started = time.perf_counter()
        features, _ = features_of(trainer, module, datamodule)
        rates.append(len(features) / (time.perf_counter() - started))
    return statistics.median(rates), len(features)


def embed_rows(photos: Path, workers: int, repeats: int, device: str, workdir: Path, rows, notes) -> None:
    from bench import decode

    with decode.own_cache_folder(workdir):
        checkpoint = embed_checkpoint(photos, workers, device, workdir)
        on_gpu, count = embed_rate(checkpoint, "gpu", workers, device, repeats)
        on_cpu, _ = embed_rate(checkpoint, "cpu", workers, device, repeats)
    rows.append(
        (
            f"embed.py feature pass, ResNet-50 @ 224 px, {count} photo JPEGs, data.decode_on=gpu, {workers} "
            f"workers, batch {batch_for(device)}: img/s",
            f"{on_gpu:.0f}",
            f"{on_cpu:.0f} (data.decode_on=cpu: decoded in the workers)",
            f"{on_gpu / on_cpu:.2f}x",
            "> 1x",
        )
    )
    notes.append(
        f"embed rows: tasks.embed.features_of (what embed.py runs before its index) over {count} images, "
        f"median of {repeats} passes after a warm-up pass, bf16-mixed, one GPU"
    )


def plan(device: str, size: dict, workers: int, parts, gpus: int) -> list[str]:
    """What a run measures, one line each: --dry-run prints it."""
    run = _run_module()
    data_root = Path("<fashion_mnist>")
    lines = []
    if "steps" in parts:
        for arch, (model, extra) in ARCHS.items():
            overrides = run.overrides_for(model, 224, data_root, device) + extra
            lines.append(
                f"steps {arch}: skuvision vs plain loop (EMA on both), {size['repeats']} pair(s) of "
                f"{size['steps']} steps after {size['warmup']}, then the plain loop without EMA: "
                + " ".join(overrides)
            )
        lines += [f"steps ResNet-50 variant: {label}: {' '.join(extra)}" for label, extra in VARIANTS]
    if "ddp" in parts:
        for processes in (1, gpus):
            overrides = ddp_overrides(data_root, processes, size["steps"], device)
            lines.append(f"ddp {processes}: python train.py " + " ".join(overrides))
    if "photos" in parts:
        lines.append(
            f"photos: {size['photos']} JPEGs, loaders cpu / gpu / cached / torchvision, {workers} workers"
        )
    if "embed" in parts:
        lines.append(
            f"embed: features_of, data.decode_on=gpu vs cpu, {workers} workers, {size['photos']} photos"
        )
    return lines


def bench_rows(
    workdir: Path,
    quick: bool = False,
    workers: int | None = None,
    device: str | None = None,
    sizes: dict | None = None,
    variants: list[str] | None = None,
    parts=PARTS,
    dry_run: bool = False,
):
    """(rows, notes). `device="cpu"` runs every part on the CPU at small sizes: a check of this file's
    code paths on a machine without a GPU, not a measurement. `sizes` overrides steps, warmup, repeats,
    photos; `variants` keeps the variant rows whose label holds one of these words; `parts`: any of PARTS;
    `dry_run`: no rows, the notes say what would run."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu" if dry_run else None)
    if device is None:
        return [], ["gpu: no CUDA device on this machine; the GPU rows were not measured"]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise SystemExit(f"bench.gpu: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    if device == "cpu":
        quick = True
    workers = workers or min(12, max(2, (os.cpu_count() or 2) - 2))
    size = {"steps": 10, "warmup": 3, "repeats": 1} if quick else {"steps": 60, "warmup": 10, "repeats": 2}
    size["photos"] = 64 if device == "cpu" else 600 if quick else 4000
    size.update(sizes or {})
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    if dry_run:
        return [], plan(device, size, workers, parts, gpus)
    run = _run_module()
    from bench import decode

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
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

    if "steps" in parts:
        section("steps", step_rows, data_root, steps, warmup, repeats, device, workdir, rows, notes, variants)
    if "ddp" in parts:
        section("ddp", ddp_rows, data_root, steps, device, workdir, rows, notes)
    if not {"photos", "embed"} & set(parts):
        return rows, notes
    started = time.perf_counter()
    photos = decode.photo_folder(workdir, count, threads=max(2, os.cpu_count() or 2))
    notes.append(f"GPU photos: {count} generated in {time.perf_counter() - started:.0f} s")
    if "embed" in parts:
        section("embed", embed_rows, photos, workers, repeats, device, workdir, rows, notes)
    if "photos" not in parts:
        return rows, notes
    section("photo loaders", photo_loader_rows, photos, count, workers, repeats, device, rows, notes)
    compute = next((float(r[1]) for r in rows if r[0].startswith("ResNet-50 @ 224 px train steps")), None)
    if compute:
        # 90 % of the photos train; 3 warm-up steps
        train_steps = min(8, count * 9 // 10 // batch_for(device) - 3)
        args = (photos, workers, train_steps, 3, device, workdir, compute, rows)
        section("photo training", photo_training_rows, *args)
    return rows, notes


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps and photos")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 2)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--device", default=None, help="cpu: check the code paths here (with --quick)")
    for name in ("steps", "warmup", "repeats", "photos"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--variants", default=None, help="comma-separated words of the variant rows to run")
    parser.add_argument(
        "--parts", default=",".join(PARTS), help=f"comma-separated, any of: {', '.join(PARTS)}"
    )
    parser.add_argument("--dry-run", action="store_true", help="print what would run, run nothing")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    workdir = args.workdir
    if workdir is None and not args.dry_run:
        workdir = Path(tempfile.mkdtemp(prefix="skuvision-bench-gpu-"))
    sizes = {k: getattr(args, k) for k in ("steps", "warmup", "repeats", "photos") if getattr(args, k)}
    variants = args.variants.split(",") if args.variants else None
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    rows, notes = bench_rows(
        workdir,
        quick=args.quick,
        workers=args.workers,
        device=args.device,
        sizes=sizes,
        variants=variants,
        parts=parts,
        dry_run=args.dry_run,
    )
    if args.dry_run:
        print("\n".join(notes))
        return
    print_section(rows, notes)


if __name__ == "__main__":
    sys.exit(main())
