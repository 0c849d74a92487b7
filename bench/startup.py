"""make bench rows for the commands' start-up: seconds until `train.py model=nosuch` (an unknown option) and
`eval.py` without ckpt_path answer, beside a new interpreter that only imports torch and one that imports
the train task (what every command imported before it started light), all measured in the same call.

Each figure is the median of REPEATS fresh interpreters, started one after another.

Alone: python -m bench.startup [--quick]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.table import run_section

ROOT = Path(__file__).resolve().parents[1]


def seconds(args: list[str], workdir: Path, repeats: int, status: int) -> float:
    """Median wall-clock seconds of `python args...` in workdir, each run asserted to exit with `status`."""
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run = subprocess.run(
            [sys.executable, *args], cwd=workdir, capture_output=True, text=True, timeout=300
        )
        times.append(time.perf_counter() - started)
        if run.returncode != status:
            raise RuntimeError(f"python {' '.join(args)}: exit {run.returncode}, {run.stderr[-500:]}")
    return statistics.median(times)


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    repeats = 3 if quick else 7
    torch_alone = seconds(["-c", "import torch"], workdir, repeats, 0)
    whole_task = seconds(["-c", "import skuvision.tasks.train"], workdir, repeats, 0)
    rows = []
    for what, args, status in (
        ("`python train.py model=nosuch` (unknown option)", [str(ROOT / "train.py"), "model=nosuch"], 1),
        ("`python eval.py` (no ckpt_path)", [str(ROOT / "eval.py")], 2),
    ):
        took = seconds(args, workdir, repeats, status)
        rows.append(
            (
                f"{what}: s until its one-line answer",
                f"{took:.2f}",
                f"{torch_alone:.2f} (`import torch` alone); {whole_task:.2f} (the train task's imports)",
                f"{took / torch_alone:.2f}x",
                "below `import torch`",
            )
        )
    notes = [f"Start-up: median of {repeats} fresh interpreters each, run one after another."]
    return rows, notes


if __name__ == "__main__":
    run_section(bench_rows, __doc__, quick_help="3 runs of each instead of 7")
