"""Reduced-scale JPEG decoding, the decoded-image cache and the device-decoding switch."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_cfg, quick_overrides
from PIL import Image
from skimage import data as photos
from torchvision.io import read_file
from torchvision.transforms import Resize
from writers import write_photo_folder

from skuvision.data.files import InputFilesDataModule, InputImageFiles
from skuvision.data.image_files import JpegBatch, collate_images, decode_batch_on_device
from skuvision.data.image_folder import ImageFolderDataModule
from skuvision.data.images import dct_scale, decode_error, open_rgb, resized_size, scan_images
from skuvision.data.transforms import ToModelInput, eval_image_transform, eval_min_side
from skuvision.errors import SkuvisionError
from skuvision.tasks import train

INPUT_224 = {
    "input_size": (3, 224, 224),
    "interpolation": "bicubic",
    "crop_pct": 0.875,
    "mean": (0.485, 0.456, 0.406),
    "std": (0.229, 0.224, 0.225),
}
INPUT_32 = {**INPUT_224, "input_size": (3, 32, 32)}

# Mean absolute difference (0-255 scale) between reduced-scale and full decoding, both through the 224 px
# eval transform. Measured on these photos: 0.3-0.4 at 1/2 scale and 0.7-1.2 at 1/4, while saving the same
# photos as quality-90 JPEG already moves the full decode 0.5-0.7 away from the lossless original. 1.5 is
# that JPEG noise twice over: far below any visible change, well above what a half-pixel shift would cost.
MAX_MEAN_ABS_DIFF = 1.5


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path / "cache"))


def large_photo(tmp_path: Path, photo: np.ndarray, size: tuple[int, int], name: str) -> Path:
    path = tmp_path / f"{name}_{size[0]}x{size[1]}.jpg"
    Image.fromarray(photo).resize(size, Image.BICUBIC).save(path, quality=90)
    return path


@pytest.mark.parametrize("size", [(1333, 1001), (1111, 1599)])  # odd sides: 1/2 and 1/4 scale
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_reduced_scale_decoding_matches_full_decoding(tmp_path, size, interpolation):
    config = {**INPUT_224, "interpolation": interpolation}
    transform, min_side = eval_image_transform(config), eval_min_side(config)
    assert dct_scale(*size, min_side) > 1  # the reduced path is what this compares
    for name in ("astronaut", "chelsea"):
        path = large_photo(tmp_path, getattr(photos, name)(), size, name)
        full = transform(open_rgb(path))
        reduced = transform(open_rgb(path, min_side, interpolation))
        assert reduced.shape == full.shape == (3, 224, 224) and reduced.dtype == torch.uint8
        diff = (reduced.int() - full.int()).abs().float().mean().item()
        assert diff < MAX_MEAN_ABS_DIFF, f"{name} {size}: mean abs diff {diff:.2f}"


def test_reduced_size_is_what_the_eval_resize_makes_of_the_full_image():
    # open_rgb resizes a reduced JPEG itself (from the exact region decoded) so that timm's Resize has
    # nothing to do: this notices if torchvision's rounding of the long side ever changes.
    for width, height in [(1333, 1001), (1001, 1333), (1600, 1000), (257, 256), (999, 1000)]:
        resized = Resize(256)(Image.new("RGB", (width, height)))
        assert resized.size == resized_size(width, height, 256)


def test_reduced_scale_keeps_at_least_the_needed_side():
    for width in range(200, 2000, 37):
        for height in (width // 2, width, 3 * width // 2):
            scale = dct_scale(width, height, 256)
            assert min(-(-width // scale), -(-height // scale)) >= 256 or scale == 1
    assert [dct_scale(2048, 2048, 256), dct_scale(1024, 1100, 256), dct_scale(300, 300, 256)] == [8, 4, 1]


def test_non_jpeg_decodes_in_full(tmp_path):
    path = tmp_path / "cutout.png"
    Image.fromarray(photos.chelsea()).resize((900, 700)).save(path)
    transform = eval_image_transform(INPUT_224)
    assert torch.equal(transform(open_rgb(path, 256, "bicubic")), transform(open_rgb(path)))


def test_truncated_jpeg_is_caught_by_the_reduced_scale_scan(tmp_path):
    good = large_photo(tmp_path, photos.astronaut(), (1200, 1000), "good")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    assert decode_error(good) is None
    reason = decode_error(truncated)
    assert reason is not None and "truncated" in reason
    assert set(scan_images(tmp_path, [good, truncated])) == {truncated}
    with pytest.raises(OSError, match="truncated"):
        open_rgb(truncated, 256, "bicubic")


def folder_module(root: Path, **kwargs) -> ImageFolderDataModule:
    options = {"split_fractions": (0.5, 0.25, 0.25), "batch_size": 4, "eval_batch_size": 8, **kwargs}
    module = ImageFolderDataModule(str(root), INPUT_32, **options)
    module.setup()
    return module


def batches(module: ImageFolderDataModule, split: str, seed: int = 0) -> list[torch.Tensor]:
    torch.manual_seed(seed)
    loader = module.train_dataloader() if split == "train" else module.test_dataloader()
    return [images for images, _ in loader]


def test_cached_batches_equal_uncached_batches(tmp_path, caplog):
    root = write_photo_folder(tmp_path / "shop", per_class=8)
    plain = folder_module(root)
    with caplog.at_level(logging.INFO):
        filling = folder_module(root, cache=True)
    assert "0 image(s) read from cache, 8 decoded and stored" in caplog.text  # the train split
    assert "decoded-image cache" in filling.training_path
    caplog.clear()
    with caplog.at_level(logging.INFO):
        later = folder_module(root, cache=True, num_workers=2)  # a later run, reading in worker processes
    assert "0 decoded and stored" in caplog.text and "0 decoded" in caplog.text
    for split in ("train", "test"):
        expected = batches(plain, split)
        for cached in (filling, later):
            got = batches(cached, split)
            assert len(got) == len(expected)
            for a, b in zip(got, expected, strict=True):
                assert torch.equal(a, b)  # the cache holds exactly what the uncached path makes


def test_changed_and_added_files_are_decoded_again(tmp_path):
    root = write_photo_folder(tmp_path / "shop", per_class=4)
    first = folder_module(root, cache=True, split_fractions=(1, 0, 0))
    train = first.splits["train"]
    changed = next(i for i, p in enumerate(train.paths) if p.suffix == ".jpg")
    path = train.paths[changed]
    old = train.image(changed)
    stat = path.stat()
    Image.fromarray(photos.coffee()).resize((220, 180)).save(path, quality=90)  # new content
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    added = root / "kettle" / "kettle_new.jpg"
    Image.fromarray(photos.chelsea()).resize((240, 200)).save(added, quality=90)

    second = folder_module(root, cache=True, split_fractions=(1, 0, 0)).splits["train"]
    assert second.cached.count == len(second) == len(train) + 1
    new = second.image(second.paths.index(path))
    assert not torch.equal(new, old)
    assert torch.equal(new, second.decode(second.paths.index(path)))  # served from the cache, up to date
    assert torch.equal(second.image(second.paths.index(added)), second.decode(second.paths.index(added)))


def test_cache_skips_unreadable_files_and_the_scan_still_reports_them(tmp_path):
    root = write_photo_folder(tmp_path / "shop", per_class=4)
    (root / "shirt" / "broken.jpg").write_bytes(b"not a jpeg")
    module = folder_module(root, cache=True, split_fractions=(1, 0, 0))
    assert any(p.endswith("broken.jpg") for p in module.skipped)
    assert module.splits["train"].cached.count == len(module.splits["train"])


def test_prediction_inputs_read_the_cache(tmp_path):
    root = write_photo_folder(tmp_path / "new", per_class=3)
    paths = sorted(root.rglob("*.*")) + [root / "missing.jpg"]
    uncached = InputImageFiles(paths, INPUT_32)
    files = InputFilesDataModule(paths, INPUT_32, batch_size=4, num_workers=0, cache=True)
    files.setup("predict")
    assert files.dataset.cached.count == len(paths) - 1
    for i in range(len(paths)):
        image, error = files.dataset[i]
        expected, expected_error = uncached[i]
        assert torch.equal(image, expected) and error == expected_error
    assert files.dataset[len(paths) - 1][1].startswith("FileNotFoundError")


def test_gpu_decoding_falls_back_to_the_cpu_without_cuda(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    root = write_photo_folder(tmp_path / "shop", per_class=4)
    with caplog.at_level(logging.INFO):
        module = folder_module(root, decode_on="gpu")
    assert caplog.text.count("data.decode_on=gpu: no CUDA device here; JPEGs are decoded on the CPU") == 1
    assert "reduced scale" in module.training_path
    expected = batches(folder_module(root), "test")
    got = batches(module, "test")
    assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_unknown_decode_on_is_refused(tmp_path):
    with pytest.raises(SkuvisionError, match="data.decode_on='tpu'"):
        ImageFolderDataModule(str(tmp_path), INPUT_32, decode_on="tpu")


def test_device_batch_decoding_gives_the_eval_geometry(tmp_path):
    """The decode_on=gpu batch step, run with the CPU as the device: JPEG bytes and already-decoded images
    (non-JPEG files) become one uint8 batch at the model's size, close to the PIL path."""
    jpeg = large_photo(tmp_path, photos.chelsea(), (1200, 1000), "cat")
    png = tmp_path / "cutout.png"
    Image.fromarray(photos.astronaut()).resize((300, 400)).save(png)
    files = InputImageFiles([jpeg, png], INPUT_224)
    files.jpeg_bytes = True
    items = [files.image(0), files.image(1)]
    assert items[0].ndim == 1 and torch.equal(items[0], read_file(str(jpeg)))  # bytes from the worker
    assert items[1].shape == (3, 224, 224)  # a PNG is decoded in the worker
    images, labels = collate_images([(items[1], 1), (items[0], 0), (items[0], 0)])
    # One tensor holds every JPEG: a batch leaves a worker in one shared-memory handle, not one per image.
    assert images.data.numel() == 2 * items[0].numel() and images.num_images == 3
    assert labels.tolist() == [1, 0, 0]
    batch = decode_batch_on_device(images, torch.device("cpu"), ToModelInput(INPUT_224).resize_crop)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.uint8
    assert torch.equal(batch[1], batch[2])
    batch = batch[[1, 0]]  # the JPEG, then the PNG
    files.jpeg_bytes = False
    pil = files.image(0)
    # torchvision's tensor resize and PIL's differ slightly in their antialiasing filters.
    assert (batch[0].int() - pil.int()).abs().float().mean() < 3
    assert torch.equal(batch[1], files.image(1))


def test_training_run_with_the_cache_from_the_config(tmp_path, data_root, caplog):
    root = write_photo_folder(tmp_path / "shop", per_class=10)
    overrides = quick_overrides("image_folder", data_root) + [
        f"data.root={root}",
        "data.cache=true",
        "data.num_workers=2",
        "trainer.fast_dev_run=true",
        "test=false",
    ]
    for run in ("first", "second"):
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train(compose_cfg("train", overrides, tmp_path / run))
        assert "training images on the decoded-image cache" in caplog.text
    assert "0 decoded and stored" in caplog.text  # the second run decoded nothing
    shards = list((tmp_path / "cache" / "decoded").glob("*/*.u8"))
    assert shards and not list((tmp_path / "cache" / "decoded").glob("*/.*tmp"))


def test_fills_started_together_decode_each_image_once(tmp_path, caplog):
    """As the processes of a DDP run do at setup: one fills, the other finds everything cached."""
    from concurrent.futures import ThreadPoolExecutor

    from skuvision.data.image_cache import DecodedImageCache

    root = write_photo_folder(tmp_path / "shop", per_class=6)
    files = InputImageFiles(sorted(root.rglob("*.*")), INPUT_32)
    with caplog.at_level(logging.INFO), ThreadPoolExecutor(2) as pool:
        fills = list(pool.map(lambda _: DecodedImageCache(INPUT_32).fill(files, workers=2), range(2)))
    assert all(f.count == len(files) for f in fills)
    assert caplog.text.count(f"{len(files)} decoded and stored") == 1
    assert caplog.text.count(f"{len(files)} image(s) read from cache, 0 decoded") == 1
    assert len(list(fills[0].shards)) == len(list(fills[1].shards)) == 1


def test_per_image_training_augmentation_decodes_whole_images_and_the_rest_is_cached(tmp_path, caplog):
    from skuvision.data.augment import ImageAugment

    root = write_photo_folder(tmp_path / "shop", per_class=8)
    augment = ImageAugment(auto_augment="rand-m9-mstd0.5-inc1", scale=(0.08, 1.0))
    with caplog.at_level(logging.INFO):
        module = folder_module(root, cache=True, augment=augment)
    train, val = module.splits["train"], module.splits["val"]
    assert train.cached is None and "needs whole images" in caplog.text
    assert train.min_side == 114  # ceil(32 / sqrt(0.08)): the smallest random crop is not upsampled
    assert val.cached is not None and val.cached.count == len(val) and val.min_side == 36
    images, _ = next(iter(module.train_dataloader()))
    assert images.shape == (4, 3, 32, 32)


def test_a_subset_fills_only_its_images(tmp_path):
    root = write_photo_folder(tmp_path / "shop", per_class=8)
    module = folder_module(root, cache=True, subset=4)
    train = module.splits["train"]
    assert len(train) == 4 and train.dataset.cached.count == 4
    assert all(train.dataset.cached.get(i) is not None for i in train.indices)


def test_device_decoding_path_runs_through_lightning(tmp_path, data_root):
    """decode_on=gpu as on a CUDA machine, with the CPU trainer's device standing in for the GPU: workers
    hand over JPEG bytes, the data module's on_before_batch_transfer decodes them, training runs."""
    from pytorch_lightning import Trainer

    from skuvision.tasks.assembly import build

    root = write_photo_folder(tmp_path / "shop", per_class=10)
    overrides = quick_overrides("image_folder", data_root) + [f"data.root={root}", "data.decode_on=gpu"]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    datamodule, module = build(cfg)
    datamodule.__dict__["device_decoding"] = True  # what setup decides where CUDA is available
    datamodule.setup()
    assert "decoded on the device" in datamodule.training_path
    images, labels = next(iter(datamodule.test_dataloader()))
    assert isinstance(images, JpegBatch) and images.jpeg_positions.numel() == images.num_images
    decoded, _ = datamodule.on_before_batch_transfer((images, labels), 0)
    reference, _ = build(cfg)
    reference.__dict__["device_decoding"] = False  # the CPU path, on any machine
    expected, _ = next(iter(reference.test_dataloader()))
    assert decoded.shape == expected.shape and decoded.dtype == torch.uint8
    assert (decoded.int() - expected.int()).abs().float().mean() < 3
    options = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    trainer = Trainer(accelerator="cpu", fast_dev_run=True, **options)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.state.finished
