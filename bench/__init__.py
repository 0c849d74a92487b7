"""make bench: `python -m bench.run [--quick] [--sections ...]` from the repository root writes
bench/results.md; one section alone: `python -m bench.<name> [--quick]`."""

import os

# Every figure runs at a fixed thread count. Set here, before any bench module imports torch, faiss or numpy:
# OpenMP reads OMP_NUM_THREADS once, when it loads; child processes (servers, train.py) inherit it.
THREADS = int(os.environ.get("BENCH_THREADS", "2"))
os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))
