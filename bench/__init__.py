"""make bench: `python -m bench.run [--quick] [--sections ...]` from the repository root writes
bench/results.md; one section alone: `python -m bench.<name> [--quick]`."""

import os

# Every figure runs at a fixed thread count. Set here, before any bench module imports torch, faiss or numpy:
# OpenMP reads OMP_NUM_THREADS once, when it loads; child processes (servers, train.py) inherit it.
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))


def images_per_second(loader, per_batch=None) -> float:
    """Images per second through one pass over `loader` (its workers' start-up included), with `per_batch`
    applied to each batch of images: the one loader clock of every bench section."""
    import time

    start, seen = time.perf_counter(), 0
    for images, _ in loader:
        if per_batch is not None:
            images = per_batch(images)
        seen += len(images)
    return seen / (time.perf_counter() - start)
