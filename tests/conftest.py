import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from skuvision.config import compose_config

sys.path.insert(0, str(Path(__file__).parent))
from writers import (  # noqa: E402
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_image_folder,
    write_manifest,
)

pytest_plugins = ["serving_fixtures"]  # tests/test_serve.py and tests/test_demo_browser.py share them

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

torch.set_num_threads(2)
os.environ.setdefault("SKUVISION_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One tree with every source in its real format: fashion_mnist/, cifar/, photos/, catalogue/styles.csv
    (a manifest of photos/), shards/ (photos/ for data=streaming)."""
    root = tmp_path_factory.mktemp("data")
    write_fashion_mnist(root / "fashion_mnist")
    write_cifar10(root / "cifar")
    write_cifar100(root / "cifar")
    write_image_folder(root / "photos")
    write_manifest(root / "catalogue" / "styles.csv", root / "photos")
    write_photo_shards(root / "photos", root / "shards")
    return root


def write_photo_shards(photos: Path, output: Path) -> None:
    """photos/ as litdata shards for data=streaming, stored at 100 px: enough for every model config's resize
    at the test sizes (input.image_size=32, or 80 for inception_v3)."""
    from skuvision.tasks.shard import shard

    overrides = [
        "data=image_folder",
        f"data.root={photos}",
        "model=simple_cnn",
        "input.image_size=80",
        "input.crop_pct=0.8",
        f"output={output}",
        "encoding=png",
        "workers=1",
    ]
    shard(compose_cfg("shard", overrides, output.parent / "shard_run"))


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


@pytest.fixture
def train_cfg(tmp_path, data_root):
    def make(data: str = "fashion_mnist", model: str = "simple_cnn", extra: list[str] | None = None):
        overrides = quick_overrides(data, data_root, model) + (extra or [])
        return compose_cfg("train", overrides, tmp_path / "run")

    return make


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
