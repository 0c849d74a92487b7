"""make bench rows for a catalogue on several processes: predict.py and embed.py as users run them over a
folder of generated product-photo JPEGs, on two CPU processes (trainer=ddp_cpu, one thread each) beside one
process with both threads (trainer=cpu threads=2), the reference, alternating.

Two figures per run: images over the wall seconds from the command's start to its CSV or index (Python's
start-up, DDP's spawn and the merge included: what a user waits for), and the steady rate the run logs with
its last shard (rank zero's images/s times the processes; start-up left out). The checkpoint is a ResNet-18
trained for two steps: speed needs no accuracy. On a GPU machine the same commands with trainer=ddp measure
N GPUs; this section runs on the CPU only.

Alone: python -m bench.catalogue [--quick]
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench import THREADS, decode
from bench.table import run_section

ROOT = Path(__file__).resolve().parents[1]
SIZE = 128
LOGGED_RATE = re.compile(r"about ([0-9.]+) images/s on (\d+) process")
SETTINGS = {  # name: (overrides, description)
    "one": (["trainer=cpu", f"threads={THREADS}", "shards=true"], f"one process, {THREADS} threads"),
    "two": (["trainer=ddp_cpu", "threads=1"], "trainer=ddp_cpu: two processes, 1 thread each"),
}


def checkpoint(photos: Path, workdir: Path) -> Path:
    """A ResNet-18 at SIZE px trained for two steps on the photo folder."""
    from skuvision.config import compose_config
    from skuvision.tasks.train import train

    overrides = [
        "model=resnet18",
        "model.pretrained=false",
        f"input.image_size={SIZE}",
        "data=image_folder",
        f"data.root={photos}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        "test=false",
        "callbacks.progress_bar=null",
        f"threads={THREADS}",
    ]
    train(compose_config("train", overrides, workdir / "train"))
    return workdir / "train" / "checkpoints" / "last.ckpt"


def timed_run(task: str, setting: str, ckpt: Path, photos: Path, count: int, run_dir: Path) -> tuple:
    """(images/s from start to end, the last logged images/s) of `python <task>.py` under `setting`."""
    overrides, _ = SETTINGS[setting]
    command = [
        sys.executable,
        str(ROOT / f"{task}.py"),
        f"ckpt_path={ckpt}",
        f"input={photos}",
        *overrides,
        "batch_size=32",
        "num_workers=0",
        f"shard_size={max(count // 8, 8)}",
        f"hydra.run.dir={run_dir}",
    ] + (["gallery=false"] if task == "predict" else [])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"{task}.py ({setting}) failed: {(done.stderr or done.stdout)[-800:]}")
    logged = LOGGED_RATE.findall(done.stdout + done.stderr)
    if not logged:
        raise RuntimeError(f"{task}.py ({setting}) logged no shard rate: {done.stderr[-400:]}")
    return count / seconds, float(logged[-1][0])


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    count, repeats = (48, 1) if quick else (256, 2)
    photos = decode.photo_folder(workdir, count)
    ckpt = checkpoint(photos, workdir)
    rows, notes = [], []
    for task in ("predict", "embed"):
        results = {name: [] for name in SETTINGS}
        for repeat in range(repeats):  # alternating, so a drift in machine speed hits both
            for name in SETTINGS:
                run_dir = workdir / f"{task}-{name}-{repeat}"
                results[name].append(timed_run(task, name, ckpt, photos, count, run_dir))
        wall = {name: statistics.median(r[0] for r in runs) for name, runs in results.items()}
        steady = {name: statistics.median(r[1] for r in runs) for name, runs in results.items()}
        rows.append(
            (
                f"{task}.py over {count} photo JPEGs, ResNet-18 @ {SIZE} px, {SETTINGS['two'][1]}: "
                "img/s, start to end (steady rate it logs)",
                f"{wall['two']:.1f} ({steady['two']:.1f})",
                f"{wall['one']:.1f} ({steady['one']:.1f}), {SETTINGS['one'][1]}",
                f"{wall['two'] / wall['one']:.2f}x ({steady['two'] / steady['one']:.2f}x)",
                "",
            )
        )
    notes.append(
        f"Catalogue rows (bench.catalogue): the real commands, float32, batch_size=32 num_workers=0, median "
        f"of {repeats} alternating run(s) per setting; start-to-end includes Python's start-up (about 7 s "
        "here), DDP's spawn and the merge into one CSV or index. Two processes also decode images in "
        "parallel, which one process with num_workers=0 does not. On a machine with N GPUs, trainer=ddp "
        "trainer.devices=N runs the same commands."
    )
    return rows, notes


if __name__ == "__main__":
    run_section(bench_rows, __doc__)
