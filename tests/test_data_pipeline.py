"""Augment presets, class balance, and ImageFolders with the files real product folders contain."""

import json

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from skuvision.data import FashionMNISTDataModule, ImageFolderDataModule
from skuvision.data.decode import open_rgb
from skuvision.data.transforms import ToModelInput, eval_image_transform
from skuvision.errors import SkuvisionError
from skuvision.tasks.train import train
from tests.helpers import ROOT, compose_cfg, quick_overrides
from tests.writers import banded_portrait, pattern_images, red_pixels, write_image_folder

PRESETS = sorted(p.stem for p in (ROOT / "conf" / "augment").glob("*.yaml"))
INPUT_64 = {
    "input_size": [3, 64, 64],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bicubic",
    "crop_pct": 0.875,
}


class Training:
    """Stands in for the Trainer: the datamodule augments only while training."""

    world_size = 1  # one process: the loaders take the whole batch

    def __init__(self, training: bool):
        self.training = training


def augment_from(name: str, tmp_path):
    cfg = compose_cfg("train", [f"augment={name}"], tmp_path / "run")
    return instantiate(cfg.augment) if cfg.get("augment") else None


def batch_through(datamodule, split: str, training: bool):
    datamodule.trainer = Training(training)
    loader = datamodule.train_dataloader() if split == "train" else datamodule.test_dataloader()
    return datamodule.on_after_batch_transfer(next(iter(loader)), 0)


def test_every_preset_is_covered():
    assert {"none", "basic", "randaugment", "trivialaugment", "mixup_cutmix"} <= set(PRESETS)


@pytest.mark.parametrize("source", ["fashion_mnist", "photos"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_gives_model_sized_normalized_batches(tmp_path, data_root, preset, source):
    augment = augment_from(preset, tmp_path)
    if source == "photos":
        config = INPUT_64
        dm = ImageFolderDataModule(
            str(data_root / "photos"), config, batch_size=8, augment=augment, num_workers=0
        )
    else:
        config = {**INPUT_64, "input_size": [1, 64, 64], "mean": [0.5], "std": [0.25]}
        dm = FashionMNISTDataModule(
            str(data_root / "fashion_mnist"),
            input_config=config,
            system_dirs=[],
            download=False,
            batch_size=8,
            augment=augment,
            num_workers=0,
        )
    dm.setup("fit")
    images, labels = batch_through(dm, "train", training=True)
    assert images.shape == (8, *config["input_size"]) and images.dtype == torch.float32
    mean = torch.tensor(config["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(config["std"]).view(1, -1, 1, 1)
    unit = images * std + mean  # undo normalization: back in [0, 1] (up to erasing noise)
    if preset != "mixup_cutmix":  # random erasing fills with normal noise
        assert unit.min() >= -1e-4 and unit.max() <= 1 + 1e-4
    if preset == "mixup_cutmix":
        assert labels.shape == (8, dm.num_classes) and labels.dtype.is_floating_point
        torch.testing.assert_close(labels.sum(1), torch.ones(8))
        assert (labels >= 0).all()
    else:
        assert labels.dtype == torch.int64


@pytest.mark.parametrize("preset", PRESETS)
def test_evaluation_batches_are_deterministic(tmp_path, data_root, preset):
    dm = ImageFolderDataModule(
        str(data_root / "photos"), input_config=INPUT_64, batch_size=8, augment=augment_from(preset, tmp_path)
    )
    a, ya = batch_through(dm, "test", training=False)
    b, yb = batch_through(dm, "test", training=False)
    assert torch.equal(a, b) and torch.equal(ya, yb)


def test_training_batches_are_augmented(tmp_path, data_root):
    dm = FashionMNISTDataModule(
        str(data_root / "fashion_mnist"),
        input_config={**INPUT_64, "input_size": [1, 28, 28], "mean": [0.5], "std": [0.5], "crop_pct": 1.0},
        system_dirs=[],
        download=False,
        batch_size=8,
        augment=augment_from("basic", tmp_path),
    )
    dm.setup("fit")
    dm.trainer = Training(True)
    raw = dm.splits["train"].images[:8]
    augmented, _ = dm.on_after_batch_transfer((raw, torch.zeros(8, dtype=torch.long)), 0)
    dm.trainer = Training(False)
    plain, _ = dm.on_after_batch_transfer((raw, torch.zeros(8, dtype=torch.long)), 0)
    assert not torch.allclose(augmented, plain)


def imbalanced_folder(root, counts=(6, 120)):
    for name, n in zip(("rare", "common"), counts, strict=True):
        (root / name).mkdir(parents=True)
        for i, img in enumerate(pattern_images(np.zeros(n, dtype=int), 16, 3, seed=n)):
            Image.fromarray(img).save(root / name / f"{i:04d}.png")
    return root


def test_sampler_balances_a_1_to_20_folder(tmp_path):
    dm = ImageFolderDataModule(
        str(imbalanced_folder(tmp_path / "shop")),
        input_config={**INPUT_64, "input_size": [3, 16, 16], "crop_pct": 1.0},
        split_fractions=[1, 0, 0],
        balance="sampler",
        batch_size=16,
        num_workers=0,
    )
    dm.setup("fit")
    assert dm.class_counts()["train"] == [120, 6]  # common, rare (sorted names)
    torch.manual_seed(0)
    labels = torch.cat([y for _, y in dm.train_dataloader()])
    frequencies = torch.bincount(labels, minlength=2).float() / len(labels)
    assert len(labels) == 126
    assert torch.allclose(frequencies, torch.full((2,), 0.5), atol=0.05)  # within 10 % of uniform


def test_loss_balance_puts_inverse_frequency_weights_in_the_loss(tmp_path, data_root):
    folder = imbalanced_folder(tmp_path / "shop")
    overrides = quick_overrides("image_folder", data_root) + [
        f"data.root={folder}",
        "data.balance=loss",
        "data.split_fractions=[1,0,0]",
        "trainer.fast_dev_run=true",
        "test=false",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    from skuvision.assembly import build

    _, module = build(cfg)
    expected = torch.tensor([126 / (2 * 120), 126 / (2 * 6)])
    torch.testing.assert_close(module.criterion.weight, expected)


def write_messy_folder(root):
    """Good PNG/JPEG photos plus every kind of file real product folders hold."""
    write_image_folder(root, classes=("kettle", "shirt"), per_class=10, size=40)
    shirt = root / "shirt"
    truncated = (root / "kettle" / "kettle_001.jpg").read_bytes()
    (shirt / "truncated.jpg").write_bytes(truncated[: len(truncated) // 2])
    (shirt / "empty.jpg").write_bytes(b"")
    (shirt / "notes.jpg").write_text("this is a text file with an image suffix")
    (shirt / ".DS_Store").write_bytes(b"\x00\x01junk")
    (shirt / "readme.txt").write_text("not an image")
    pixels = pattern_images(np.ones(1, dtype=int), 40, 3, seed=7)[0]
    Image.fromarray(pixels).convert("CMYK").save(shirt / "cmyk.jpg")
    Image.fromarray(pixels[..., 0].astype(np.uint16) * 257).save(shirt / "sixteen_bit.png")
    rgba = Image.fromarray(pixels).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(shirt / "transparent.png")
    Image.fromarray(pixels).convert("P").save(shirt / "palette.png")
    return {
        "bad": {"truncated.jpg", "empty.jpg", "notes.jpg"},
        "odd_good": {"cmyk.jpg", "sixteen_bit.png", "transparent.png", "palette.png"},
    }


def test_messy_folder_trains_and_lists_the_bad_files(tmp_path, data_root):
    folder = tmp_path / "shop"
    kinds = write_messy_folder(folder)
    overrides = quick_overrides("image_folder", data_root) + [
        f"data.root={folder}",
        "data.split_fractions=[0.6,0.2,0.2]",
        "trainer.max_epochs=1",
        "data.num_workers=2",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert {p.split("/")[-1] for p in skipped} == kinds["bad"]
    counts = json.loads((tmp_path / "run" / "class_counts.json").read_text())
    used = sum(sum(split.values()) for split in counts.values())
    assert used == 10 + 10 + len(kinds["odd_good"])  # every readable image, nothing else


def test_odd_modes_become_sensible_rgb(tmp_path):
    kinds = write_messy_folder(tmp_path / "shop")
    shirt = tmp_path / "shop" / "shirt"
    for name in kinds["odd_good"]:
        img = open_rgb(shirt / name)
        assert img.mode == "RGB" and img.size == (40, 40)
    sixteen = np.asarray(open_rgb(shirt / "sixteen_bit.png"))
    source = pattern_images(np.ones(1, dtype=int), 40, 3, seed=7)[0][..., 0]
    assert np.abs(sixteen[..., 0].astype(int) - source.astype(int)).max() <= 1  # scaled, not clipped to white
    transparent = np.asarray(open_rgb(shirt / "transparent.png")).astype(int)
    dark = source < 60
    assert (transparent[dark] > 100).all()  # half-transparent dark pixels laid on white, not on black


def test_empty_class_folder_is_named(tmp_path):
    write_image_folder(tmp_path / "shop", classes=("kettle", "shirt"), per_class=4)
    (tmp_path / "shop" / "toaster").mkdir()
    dm = ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_64)
    with pytest.raises(SkuvisionError, match=r"class folder .*toaster has no readable images"):
        dm.setup("fit")


def test_single_class_is_a_clear_error(tmp_path):
    write_image_folder(tmp_path / "shop", classes=("kettle",), per_class=4)
    with pytest.raises(SkuvisionError, match=r"needs at least two class subfolders.*only .*kettle"):
        ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_64).setup("fit")


def test_class_missing_from_val_is_a_warning(tmp_path, caplog):
    write_image_folder(tmp_path / "shop", presplit=True, classes=("kettle", "shirt"), per_class=6)
    for f in (tmp_path / "shop" / "val" / "shirt").iterdir():
        f.unlink()
    dm = ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_64)
    dm.setup("fit")
    assert "class 'shirt' has no images in the val split" in caplog.text
    assert dm.class_counts()["val"] == [2, 0]


def test_class_order_is_sorted_by_folder_name(tmp_path):
    write_image_folder(tmp_path / "shop", classes=("zebra_print", "apple_phone", "kettle"), per_class=6)
    dm = ImageFolderDataModule(str(tmp_path / "shop"), input_config=INPUT_64)
    assert dm.class_names == ["apple_phone", "kettle", "zebra_print"]


@pytest.mark.parametrize("preset", ["randaugment", "trivialaugment"])
def test_every_policy_op_runs_at_the_top_magnitude(tmp_path, preset):
    """Magnitude noise reaches timm's maximum, where the increasing posterize keeps 0 bits: every op of the
    preset's policy must still run there (Pillow 13 refuses 0 bits, hence the pin in pyproject.toml)."""
    from timm.data.auto_augment import RandAugment

    augment = augment_from(preset, tmp_path)
    transform = augment.image_transform({**INPUT_64, "input_size": [3, 32, 32]})
    (policy,) = [t for t in transform.transforms if isinstance(t, RandAugment)]
    image = Image.fromarray(pattern_images(np.zeros(1, dtype=int), 32, 3, seed=0)[0])
    for op in policy.ops:
        op.prob, op.magnitude, op.magnitude_std = 1.0, 1e6, 0.0  # timm clips it to its top magnitude
        assert op(image).size == image.size, op.name


# --- input.crop_mode: a whole portrait photo reaches the model ----------------------------------------------
INPUT_32 = {**INPUT_64, "input_size": [3, 32, 32], "crop_pct": 1.0}


def both_paths(config: dict, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 CHW at the model's size from timm's per-image PIL transform and from the batched ToModelInput
    (in-memory sets, device-decoded JPEGs)."""
    pil = eval_image_transform(config)(image)
    pixels = torch.from_numpy(np.array(image)).reshape(image.height, image.width, -1).permute(2, 0, 1)
    return pil, ToModelInput(config).resize_crop(pixels.unsqueeze(0))[0]


def test_center_crop_cuts_off_the_top_and_bottom_of_a_portrait_photo():
    for image in both_paths({**INPUT_32, "crop_mode": "center"}, banded_portrait()):
        assert image.shape == (3, 32, 32) and not red_pixels(image).any()


def test_squash_keeps_the_top_and_bottom_rows():
    for image in both_paths({**INPUT_32, "crop_mode": "squash"}, banded_portrait()):
        red = red_pixels(image)
        assert red[0].all() and red[-1].all() and not red[8:24].any()


def test_border_keeps_the_whole_image_and_pads_the_sides_with_timms_fill():
    # 60x80 fitted into 32x32 is 24x32: 4 columns of padding each side, the value timm pads with (the mean).
    fill = torch.tensor([round(255 * m) for m in INPUT_32["mean"]], dtype=torch.uint8).view(3, 1, 1)
    for image in both_paths({**INPUT_32, "crop_mode": "border"}, banded_portrait()):
        red = red_pixels(image)
        assert red[0, 4:28].all() and red[-1, 4:28].all() and not red[8:24].any()
        assert (image[:, :, :4] == fill).all() and (image[:, :, 28:] == fill).all()
        assert not (image[:, 1:-1, 4:28] == fill).all(dim=0).all()  # the image itself is not padding


@pytest.mark.parametrize("channels", [3, 1])
@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
def test_batched_and_pil_paths_agree_for_every_crop_mode(crop_mode, crop_pct, channels):
    config = {**INPUT_32, "crop_pct": crop_pct, "crop_mode": crop_mode}
    if channels == 1:
        config = {**config, "input_size": [1, 32, 32], "mean": [0.45], "std": [0.226]}
    image = banded_portrait(width=90, height=120)
    pil, batched = both_paths(config, image if channels == 3 else image.convert("L"))
    assert pil.shape == batched.shape == (channels, 32, 32)
    # torchvision's tensor resize and PIL's differ by rounding in their antialiasing filters.
    assert (pil.int() - batched.int()).abs().max() <= 2


def test_a_config_without_crop_mode_is_center():
    """Input configs stored before crop_mode existed (checkpoints, shards, model.json) cropped the center."""
    old = dict(INPUT_32)
    pil, batched = both_paths(old, banded_portrait())
    center, center_batched = both_paths({**old, "crop_mode": "center"}, banded_portrait())
    assert torch.equal(pil, center) and torch.equal(batched, center_batched)
