"""What many tests share: the checkout's paths, real configs composed for a small CPU run, and the commands
run as a user runs them."""

import os
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from skuvision.config import compose_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

DATA_ROOTS = {
    "fashion_mnist": "fashion_mnist",
    "cifar10": "cifar",
    "cifar100": "cifar",
    "image_folder": "photos",
    "manifest": "catalogue/styles.csv",
    "streaming": "shards",
}


def compose_cfg(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose a real config as train.py/eval.py would, with its run folder at output_dir."""
    return compose_config(config_name, overrides, output_dir)


def quick_overrides(data: str, data_root: Path, model: str = "simple_cnn") -> list[str]:
    """A CPU-cheap run: small images and batches, no pretrained download, offline data only."""
    size = 80 if model == "inception_v3" else 32
    return [
        f"data={data}",
        f"model={model}",
        f"data.root={data_root / DATA_ROOTS[data]}",
        "data.download=false",
        "data.batch_size=8",
        "data.eval_batch_size=16",
        "data.num_workers=0",
        f"input.image_size={size}",
        "model.pretrained=false",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        "trainer.accelerator=cpu",
        "threads=2",
    ]


def trained_checkpoint(run: Path, overrides: list[str]) -> Path:
    """train.py in-process into the run folder `run`: its best checkpoint."""
    from skuvision.tasks.train import train

    train(compose_cfg("train", overrides, run))
    return sorted((run / "checkpoints").glob("best-*.ckpt"))[0]


def train_on_folder(classes: Path, run: Path, epochs: int, tta: str) -> Path:
    """A simple_cnn trained at 32 px in fp32 on the class folders in `classes` (lr 0.01, TTA `tta`): its best
    checkpoint."""
    overrides = quick_overrides("image_folder", classes) + [
        f"data.root={classes}",
        f"trainer.max_epochs={epochs}",
        "optimizer.lr=0.01",
        "trainer.precision=32",
        f"tta={tta}",
    ]
    return trained_checkpoint(run, overrides)


def run_cli(script: str, overrides: list[str], cwd, extra_env: dict | None = None):
    """Run train.py/eval.py as a user would, offline, with 2 threads."""
    env = {**os.environ, "SKUVISION_OFFLINE": "1", "OMP_NUM_THREADS": "2", **(extra_env or {})}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        stdin=subprocess.DEVNULL,  # CI and sweeps have no stdin: nothing may prompt
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )


def predict_csv(checkpoint, inputs, folder: Path, *extra: str) -> tuple[list[str], list[dict]]:
    """predict.py on a folder of images on the CPU in float32: (header, rows) of its CSV."""
    import csv

    from skuvision.tasks.predict import predict

    overrides = [
        f"ckpt_path={checkpoint}",
        f"input={inputs}",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        *extra,
    ]
    out = predict(compose_cfg("predict", overrides, folder / "run"))
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    return reader.fieldnames, rows


def printed_by(code: str) -> str:
    """What `python -c code` prints in a fresh process with this one's environment, asserted to succeed."""
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    return fresh.stdout.strip()


def run_alone(code: str, args: list, cwd: Path, extra_env: dict) -> subprocess.CompletedProcess:
    """`python -c code args` in a fresh process without this checkout on its path (what a user's machine
    without skuvision runs), asserted to succeed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | extra_env
    fresh = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    return fresh


def refusal(task, config_name: str, overrides: list[str], output_dir: Path, capsys) -> str:
    """What `<config_name>.py overrides...` prints on stderr when `task` refuses the command, without the
    import of a new interpreter: the config composed as the command composes it, the task run through the
    commands' own wrapper (tasks.utils.run_cli), asserted to exit with status 2 (any other exception, a
    traceback, goes up and fails the test)."""
    import pytest

    from skuvision.tasks.utils import run_cli as run_task

    cfg = compose_cfg(config_name, overrides, output_dir)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_task(task, cfg)
    assert exited.value.code == 2
    return capsys.readouterr().err
