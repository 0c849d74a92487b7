"""Data sources read the real formats, split deterministically, and fail with a clear message."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from skuvision.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    FashionMNISTDataModule,
    ImageFolderDataModule,
)
from skuvision.data.datamodule import stratified_split, subset_indices
from skuvision.data.fashion_mnist import read_idx
from skuvision.errors import SkuvisionError
from tests.writers import write_image_folder

INPUT_28 = {
    "input_size": [1, 28, 28],
    "mean": [0.5],
    "std": [0.5],
    "interpolation": "bilinear",
    "crop_pct": 1.0,
}
INPUT_32 = {**INPUT_28, "input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}


def ready(datamodule):
    datamodule.setup("fit")
    return datamodule


def test_fashion_mnist_reads_idx_gz(data_root):
    dm = ready(
        FashionMNISTDataModule(
            str(data_root / "fashion_mnist"), input_config=INPUT_28, system_dirs=[], download=False
        )
    )
    assert (len(dm.splits["train"]), len(dm.splits["val"]), len(dm.splits["test"])) == (360, 40, 100)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.dtype == torch.uint8 and images.shape[1:] == (1, 28, 28)
    raw = read_idx(data_root / "fashion_mnist" / "t10k-labels-idx1-ubyte.gz")
    assert torch.equal(dm.splits["test"].labels, torch.from_numpy(raw.astype(np.int64)))
    assert dm.class_names[0] == "T-shirt/top" and dm.in_chans == 1


def test_truncated_idx_file_is_named(tmp_path, data_root):
    data = gzip.open(data_root / "fashion_mnist" / "t10k-images-idx3-ubyte.gz").read()
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(data[:1000])
    with pytest.raises(SkuvisionError, match="t10k-images-idx3-ubyte.gz is truncated"):
        read_idx(bad)


def test_cifar10_and_100_read_pickle_batches(data_root):
    c10 = ready(CIFAR10DataModule(str(data_root / "cifar"), input_config=INPUT_32, download=False))
    assert len(c10.splits["train"]) + len(c10.splits["val"]) == 300 and len(c10.splits["test"]) == 60
    assert c10.class_names[:2] == ["airplane", "automobile"]
    c100 = ready(CIFAR100DataModule(str(data_root / "cifar"), input_config=INPUT_32, download=False))
    assert c100.num_classes == 100 and c100.class_names[5] == "bed"
    images, _ = c100.splits["test"][0]
    assert images.shape == (3, 32, 32) and images.dtype == torch.uint8


def test_val_split_is_stratified_and_seeded():
    labels = np.repeat(np.arange(4), [100, 50, 30, 20])
    a = stratified_split(labels, [0.8, 0.2], seed=1)
    b = stratified_split(labels, [0.8, 0.2], seed=1)
    c = stratified_split(labels, [0.8, 0.2], seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[1], c[1])
    assert np.bincount(labels[a[1]]).tolist() == [20, 10, 6, 4]
    assert len(np.intersect1d(a[0], a[1])) == 0 and len(a[0]) + len(a[1]) == len(labels)


def test_subset_fraction_and_count():
    labels = np.repeat(np.arange(5), 100)
    assert len(subset_indices(labels, 0.1, seed=0)) == 50
    assert len(subset_indices(labels, 30, seed=0)) == 30
    assert np.bincount(labels[subset_indices(labels, 0.1, seed=0)]).tolist() == [10] * 5
    assert len(subset_indices(labels, None, seed=0)) == 500


def test_subset_applies_to_every_split(data_root):
    dm = FashionMNISTDataModule(
        str(data_root / "fashion_mnist"), input_config=INPUT_28, system_dirs=[], download=False, subset=20
    )
    ready(dm)
    assert {len(s) for s in dm.splits.values()} == {20}


def test_image_folder_split_by_fractions(data_root):
    dm = ready(
        ImageFolderDataModule(
            str(data_root / "photos"), input_config=INPUT_32, split_fractions=[0.5, 0.25, 0.25]
        )
    )
    assert dm.class_names == ["phone", "shirt", "toaster"]
    sizes = {k: len(v) for k, v in dm.splits.items()}
    assert sizes == {"train": 18, "val": 9, "test": 9}
    files = [set(p for p, _ in ds.samples) for ds in dm.splits.values()]
    assert not (files[0] & files[1]) and not (files[0] & files[2])
    image, label = dm.splits["train"][0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)


def test_image_folder_presplit(tmp_path):
    write_image_folder(tmp_path / "shop", presplit=True, per_class=6)
    dm = ready(ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_32))
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 18, "val": 6, "test": 6}


def test_the_train_folder_of_a_split_folder_is_named_with_the_parent_to_use(tmp_path, caplog):
    shop = write_image_folder(tmp_path / "shop", presplit=True, per_class=6)
    dm = ready(ImageFolderDataModule(str(shop / "train"), input_config=INPUT_32))
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 15, "val": 0, "test": 3}  # split again
    warned = [
        r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "data.root=" in r.message
    ]
    assert warned == [
        f"data.root={shop / 'train'} is the train/ folder of {shop}, which has train/, val/ and test/: it is "
        "split again by data.split_fractions and the folder's own val/ and test/ are never used; to train on "
        f"that split, use data.root={shop}"
    ]
    caplog.clear()
    ready(ImageFolderDataModule(str(shop), input_config=INPUT_32))  # the whole split folder: no warning
    (tmp_path / "photos" / "train").mkdir(parents=True)  # a folder named train without val/ test/ beside it
    write_image_folder(tmp_path / "photos" / "train", per_class=6)
    ready(ImageFolderDataModule(str(tmp_path / "photos" / "train"), input_config=INPUT_32))
    assert "data.root=" not in caplog.text


def test_image_folder_class_missing_from_train_is_named(tmp_path):
    write_image_folder(tmp_path / "shop", presplit=True, per_class=6)
    (tmp_path / "shop" / "val" / "kettle").mkdir()
    write_image_folder(tmp_path / "extra", classes=("kettle",), per_class=2)
    for f in (tmp_path / "extra" / "kettle").iterdir():
        f.rename(tmp_path / "shop" / "val" / "kettle" / f.name)
    dm = ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_32)
    with pytest.raises(SkuvisionError, match=r"class folder .*val/kettle is not among the training classes"):
        dm.setup("fit")


def test_image_folder_root_must_exist(tmp_path):
    with pytest.raises(SkuvisionError, match=r"data.root=.*nowhere is not a folder"):
        _ = ImageFolderDataModule(str(tmp_path / "nowhere"), input_config=INPUT_32).class_names


def test_image_unreadable_after_setup_names_the_file(tmp_path):
    write_image_folder(tmp_path / "shop", per_class=4)
    dm = ready(
        ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_32, split_fractions=[1, 0, 0])
    )
    path, _ = dm.splits["train"].samples[0]
    Path(path).write_text("replaced by text after the scan")
    with pytest.raises(SkuvisionError, match=f"cannot read image {path}"):
        dm.splits["train"][0]


def test_in_memory_and_pil_paths_agree(tmp_path):
    """The same pixels through both paths give the same normalized eval tensor (interpolation tolerance)."""
    from PIL import Image

    from skuvision.data.datamodule import ImageDataModule
    from skuvision.data.transforms import eval_image_transform

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, size=(32, 32, 3), dtype=np.uint8)
    cfg = {
        "input_size": [3, 64, 64],
        "mean": [0.4] * 3,
        "std": [0.2] * 3,
        "interpolation": "bilinear",
        "crop_pct": 0.875,
    }
    dm = ImageDataModule(root=".", input_config=cfg)
    pil = eval_image_transform(cfg)(Image.fromarray(pixels)).unsqueeze(0)
    memory = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)
    a, _ = dm.on_after_batch_transfer((pil, torch.zeros(1)), 0)
    b, _ = dm.on_after_batch_transfer((memory, torch.zeros(1)), 0)
    assert a.shape == b.shape == (1, 3, 64, 64)
    assert (a - b).abs().mean() < 0.05  # in normalized units: about 1/100 of the pixel range


def fashion_mnist(data_root, **kwargs) -> FashionMNISTDataModule:
    root = str(data_root / "fashion_mnist")
    return FashionMNISTDataModule(root, input_config=INPUT_28, system_dirs=[], download=False, **kwargs)


def test_a_subset_of_nothing_names_the_key(data_root):
    with pytest.raises(
        SkuvisionError, match=r"^data.subset=0.0 leaves no samples; use a fraction in \(0, 1\]"
    ):
        fashion_mnist(data_root, subset=0.0).setup()


@pytest.mark.parametrize("val_fraction", [0.0, 1.5])
def test_a_val_fraction_outside_zero_to_one_names_the_key(data_root, val_fraction):
    with pytest.raises(SkuvisionError, match=rf"^data.val_fraction={val_fraction} must be in \(0, 1\)$"):
        fashion_mnist(data_root, val_fraction=val_fraction).setup()


@pytest.mark.parametrize("fractions", [[0.8, 0.2], [0.8, -0.1, 0.3], [0, 0, 0]])
def test_split_fractions_are_checked_alike_by_both_file_sources(tmp_path, fractions):
    from skuvision.data import ManifestDataModule

    message = rf"^data.split_fractions={fractions} must be three non-negative numbers$".replace("[", r"\[")
    for source in (ImageFolderDataModule, ManifestDataModule):
        with pytest.raises(SkuvisionError, match=message):
            source(str(tmp_path), input_config=INPUT_32, split_fractions=fractions)


def test_in_memory_images_that_are_not_uint8_name_the_source_and_what_it_gave():
    from skuvision.data import ImageDataModule, InMemoryImages

    class FloatImages(ImageDataModule):
        class_names = ["a", "b"]

        def load_splits(self):
            return {"train": InMemoryImages(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1]))}

    expected = (
        r"^FloatImages \(data._target_\) gave torch.float32 images of shape \(4, 3, 8, 8\) for the train"
    )
    with pytest.raises(SkuvisionError, match=expected):
        FloatImages(root=".", input_config=INPUT_32).setup()


def test_the_data_report_holds_class_counts_per_split_and_the_skipped_files(tmp_path):
    root = write_image_folder(tmp_path / "shop", per_class=4)
    broken = root / "phone" / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    dm = ready(ImageFolderDataModule(str(root), input_config=INPUT_32, split_fractions=[1, 0, 0]))
    report = dm.data_report()
    assert report["class_counts"] == {
        "train": {"phone": 4, "shirt": 4, "toaster": 4},
        "val": {"phone": 0, "shirt": 0, "toaster": 0},
        "test": {"phone": 0, "shirt": 0, "toaster": 0},
    }
    assert (
        list(report["skipped"]) == [str(broken)]
        and "UnidentifiedImageError" in report["skipped"][str(broken)]
    )


def test_labels_and_file_paths_of_a_split_are_read_off_the_data_module(tmp_path, data_root):
    root = write_image_folder(tmp_path / "shop", per_class=4)
    files = ready(
        ImageFolderDataModule(str(root), input_config=INPUT_32, split_fractions=[1, 0, 0], subset=6)
    )
    train = files.splits["train"]  # a Subset of the split's files
    assert files.sample_paths("train") == [str(train.dataset.samples[i][0]) for i in train.indices]
    assert files.split_labels("train") == [train.dataset.targets[i] for i in train.indices]
    assert files.sample_paths("val") is None  # an empty split names no files
    in_memory = ready(fashion_mnist(data_root))
    assert in_memory.skipped == {} and in_memory.sample_paths("test") is None
    assert in_memory.split_labels("test") == in_memory.splits["test"].labels.tolist()


@pytest.mark.parametrize(("channels", "mode"), [(1, "L"), (3, "RGB")])
def test_a_dataset_image_as_a_picture_keeps_its_pixels(channels, mode):
    """torchvision's to_pil_image, which galleries, plots, the audit and the server use on dataset images."""
    from torchvision.transforms.v2.functional import to_pil_image

    image = torch.randint(0, 256, (channels, 6, 5), dtype=torch.uint8)
    picture = to_pil_image(image)
    assert picture.mode == mode and picture.size == (5, 6)
    expected = image.permute(1, 2, 0).squeeze(-1).numpy()
    assert np.array_equal(np.asarray(picture), expected)
