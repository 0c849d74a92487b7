import os
from pathlib import Path

import pytest
import torch

from tests.helpers import compose_cfg, quick_overrides
from tests.writers import (
    write_cifar10,
    write_cifar100,
    write_fashion_mnist,
    write_image_folder,
    write_manifest,
)

pytest_plugins = ["tests.serving_fixtures"]  # tests/test_serve.py and tests/test_demo_browser.py share them

torch.set_num_threads(2)
os.environ.setdefault("SKUVISION_OFFLINE", "1")  # tests never reach for the network
os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="marked gpu: needs a CUDA device, and torch sees none here")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture
def one_faiss_thread():
    """FAISS's OpenMP threads spin-wait: on a busy 2-core machine two of them train PQ ~20x slower."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


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


@pytest.fixture
def train_cfg(tmp_path, data_root):
    def make(data: str = "fashion_mnist", model: str = "simple_cnn", extra: list[str] | None = None):
        overrides = quick_overrides(data, data_root, model) + (extra or [])
        return compose_cfg("train", overrides, tmp_path / "run")

    return make


CATALOGUE_LABELS = ["articleType", "masterCategory", "baseColour"]
BROKEN_LINE = 5  # its display name gets an unquoted comma: 12 fields for the header's 11
MISSING_IMAGES = (20, 21)  # products whose image is not in images/


@pytest.fixture(scope="session")
def catalogue_export(tmp_path_factory) -> Path:
    """styles.csv as the public product-image export has it, with the defects real ones have: no path column
    (images/<id>.jpg), 3:4 photos, a line with an unquoted comma, missing images, CRLF line ends, and an
    empty baseColour on every ninth row."""
    from tests.writers import write_catalogue_export

    root = tmp_path_factory.mktemp("catalogue_export")
    csv, lines = write_catalogue_export(root, n=240)
    for word in ("Tshirts", "Shirts", "Sandals", "Heels"):
        lines[BROKEN_LINE - 1] = lines[BROKEN_LINE - 1].replace(f" {word} ", f" {word}, slim ")
    for k in range(1, len(lines), 9):
        fields = lines[k].split(",")
        if len(fields) == 11:
            fields[5] = ""
            lines[k] = ",".join(fields)
    csv.write_text("\r\n".join(lines) + "\r\n")
    for k in MISSING_IMAGES:
        (root / "images" / f"{10000 + k}.jpg").unlink()
    return csv


def catalogue_overrides(export: Path) -> list[str]:
    """A model with several heads on the export: three label columns (masterCategory read off
    articleType) and a tag column, the whole portrait photo (crop_mode=squash)."""
    return quick_overrides("manifest", export.parent) + [
        f"data.root={export}",
        'data.path_pattern="images/{id}.jpg"',
        f"data.label_columns=[{','.join(CATALOGUE_LABELS)}]",
        "data.tag_columns=[tags]",
        "input.crop_mode=squash",  # stickers sit in the top rows, which a centre crop cuts
    ]


@pytest.fixture(scope="session")
def catalogue_run(catalogue_export, tmp_path_factory) -> Path:
    """One model trained on the export: three label columns (masterCategory read off articleType), a tag
    column, the whole portrait photo (crop_mode=squash), flip TTA. Its run folder."""
    from skuvision.tasks.train import train

    run = tmp_path_factory.mktemp("catalogue_train") / "run"
    overrides = catalogue_overrides(catalogue_export) + [
        "trainer.max_epochs=6",
        "data.batch_size=16",
        "callbacks.early_stopping=null",
        "trainer.precision=32",
        "tta=flip",
    ]
    train(compose_cfg("train", overrides, run))
    return run
