"""Reduced-scale JPEG decoding, the decoded-image cache and the device-decoding switch."""

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from skimage import data as photos
from torchvision.io import read_file
from torchvision.transforms import Resize

from skuvision.data.datasets import InputImageFiles
from skuvision.data.decode import (
    ImageOverBudget,
    JpegBatch,
    JpegFile,
    collate_images,
    dct_scale,
    decode_batch_on_device,
    decode_error,
    eval_resize_size,
    open_rgb,
    pixel_budget,
    resized_size,
    scan_images,
)
from skuvision.data.image_folder import ImageFolderDataModule
from skuvision.data.inputs import InputFilesDataModule
from skuvision.data.transforms import ToModelInput, eval_image_transform, eval_min_side, eval_pixel_budget
from skuvision.errors import SkuvisionError
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides
from tests.writers import banded_portrait, red_pixels, write_huge_png, write_oriented_jpeg, write_photo_folder

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
    assert isinstance(items[0], JpegFile) and torch.equal(items[0].data, read_file(str(jpeg)))  # bytes
    assert items[0].orientation == 1
    assert items[1].shape == (3, 224, 224)  # a PNG is decoded in the worker
    images, labels = collate_images([(items[1], 1), (items[0], 0), (items[0], 0)])
    # One tensor holds every JPEG: a batch leaves a worker in one shared-memory handle, not one per image.
    assert images.data.numel() == 2 * items[0].data.numel() and images.num_images == 3
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

    from skuvision.data.decode_cache import DecodedImageCache

    root = write_photo_folder(tmp_path / "shop", per_class=6)
    files = InputImageFiles(sorted(root.rglob("*.*")), INPUT_32)
    with caplog.at_level(logging.INFO), ThreadPoolExecutor(2) as pool:
        fills = list(pool.map(lambda _: DecodedImageCache(INPUT_32).fill(files, workers=2), range(2)))
    assert all(f.count == len(files) for f in fills)
    assert caplog.text.count(f"{len(files)} decoded and stored") == 1
    assert caplog.text.count(f"{len(files)} image(s) read from cache, 0 decoded") == 1
    assert len(list(fills[0].shards)) == len(list(fills[1].shards)) == 1


def test_a_transform_that_does_not_fit_the_cache_is_a_bug_not_an_unreadable_file(tmp_path):
    """The cache's image shape and the eval transform come from one input config: a mismatch is raised as
    the program's error, never caught as a file that does not decode (ValueError is one of DECODE_ERRORS)."""
    from skuvision.data.decode_cache import DecodedImageCache

    root = write_photo_folder(tmp_path / "shop", per_class=2)
    files = InputImageFiles(sorted(root.rglob("*.*")), INPUT_32)
    with pytest.raises(
        RuntimeError, match=r"the transform gave torch.uint8 \(3, 32, 32\), not uint8 \(3, 64, 64\)"
    ):
        DecodedImageCache({**INPUT_32, "input_size": (3, 64, 64)}).fill(files, workers=1)
    assert not list((tmp_path / "cache" / "decoded").glob("*/*.u8")), "nothing is published"


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

    from skuvision.assembly import build

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


# --- EXIF orientation: every decode path sees a phone photo the way a person does


def photo(size: tuple[int, int] = (1333, 1001), name: str = "astronaut") -> Image.Image:
    """An asymmetric real photo at `size` (odd sides: the reduced decode ends in a partial pixel)."""
    return Image.fromarray(getattr(photos, name)()).resize(size, Image.BICUBIC)


def oriented_twins(folder: Path, upright: Image.Image, orientation: int = 6) -> dict[str, Path]:
    """The same picture three ways: upright (no tag), stored turned with the EXIF tag that turns it back
    (as a phone writes it), and the same stored pixels without the tag (what a decoder ignoring EXIF sees)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"upright": folder / "upright.jpg", "oriented": folder / f"oriented_{orientation}.jpg"}
    upright.save(paths["upright"], quality=95)
    write_oriented_jpeg(paths["oriented"], upright, orientation)
    paths["sideways"] = folder / f"sideways_{orientation}.jpg"
    with Image.open(paths["oriented"]) as stored:
        stored.convert("RGB").save(paths["sideways"], quality=95)  # no exif= : the tag is gone
    return paths


def mean_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.int() - b.int()).abs().float().mean().item()


@pytest.mark.parametrize("orientation", range(2, 9))
@pytest.mark.parametrize("decoding", ["full", "reduced", "reduced, resized"])
def test_oriented_jpeg_decodes_as_its_upright_twin(tmp_path, orientation, decoding):
    """Full decoding (eval of small files, the demo's pictures), reduced and resized from the decoded region
    (eval, predict, serve: odd sides, so the region ends in a partial pixel whose edge turns with the image),
    and reduced alone (the augmented training split; even sides: without the resize, a partial last pixel
    stretches any odd-sided image, turned or not, by half a reduced pixel, unseen by random crops)."""
    size = (1334, 1002) if decoding == "reduced" else (1333, 1001)
    twins = oriented_twins(tmp_path, photo(size), orientation)
    with Image.open(twins["oriented"]) as stored:  # the file says what Pillow's own exif_transpose says
        assert stored.getexif()[ExifTags.Base.Orientation] == orientation
        seen = np.asarray(ImageOps.exif_transpose(stored)).astype(int)
    assert np.abs(seen - np.asarray(photo(size)).astype(int)).mean() < MAX_MEAN_ABS_DIFF
    transform, min_side = eval_image_transform(INPUT_224), eval_min_side(INPUT_224)
    args = {"full": (), "reduced": (min_side,), "reduced, resized": (min_side, "bicubic")}[decoding]
    if args:
        assert dct_scale(*size[::-1], min_side) == dct_scale(*size, min_side) == 2
    upright = transform(open_rgb(twins["upright"], *args))
    oriented = transform(open_rgb(twins["oriented"], *args))
    assert open_rgb(twins["oriented"], *args).size == open_rgb(twins["upright"], *args).size
    assert mean_abs_diff(oriented, upright) < MAX_MEAN_ABS_DIFF
    # What the model saw before: the stored pixels, far from the upright picture.
    assert mean_abs_diff(transform(open_rgb(twins["sideways"], *args)), upright) > 10


def test_folder_dataset_and_its_cache_see_phone_photos_upright(tmp_path):
    """The train/eval path: an ImageFolder's items, uncached and from the decoded-image cache."""
    root = tmp_path / "shop"
    twins = oriented_twins(root / "portrait", photo())
    other = root / "other"
    other.mkdir()
    photo((900, 700), "coffee").save(other / "coffee.jpg", quality=90)
    for cache in (False, True):
        train = folder_module(root, split_fractions=(1, 0, 0), cache=cache).splits["train"]
        if cache:
            assert train.cached.count == len(train) == 4
        items = {path.stem.split("_")[0]: train[i][0] for i, path in enumerate(train.paths)}
        assert mean_abs_diff(items["oriented"], items["upright"]) < MAX_MEAN_ABS_DIFF
        assert mean_abs_diff(items["sideways"], items["upright"]) > 10
        oriented = train.paths.index(twins["oriented"])
        assert torch.equal(train.image(oriented), train.decode(oriented))  # the cache holds the upright crop


def test_decoded_cache_from_before_orientation_is_not_reused():
    """Crops cached before orientation was applied are sideways: their folder (geometry key) is not read."""
    import hashlib
    import json

    import PIL
    import torchvision

    from skuvision.data.decode_cache import geometry_key

    before = {  # what format 1 hashed
        "format": 1,
        "input_size": [224, 224],
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "channels": 3,
        "decode": "pillow-dct-draft",
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
    }
    old_key = hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    assert geometry_key(INPUT_224, 3) != old_key


def test_prediction_inputs_see_phone_photos_upright(tmp_path):
    twins = oriented_twins(tmp_path, photo())
    files = InputImageFiles([twins["upright"], twins["oriented"], twins["sideways"]], INPUT_224)
    (upright, e0), (oriented, e1), (sideways, e2) = files[0], files[1], files[2]
    assert e0 == e1 == e2 == ""
    assert mean_abs_diff(oriented, upright) < MAX_MEAN_ABS_DIFF
    assert mean_abs_diff(sideways, upright) > 10


def test_upright_table_matches_torchvision_and_pillow(tmp_path):
    """The device path's orientation step (tensor ops that run on the decoding device) against torchvision's
    CPU decoder with apply_exif_orientation and against Pillow's exif_transpose, for every orientation."""
    from torchvision.io import decode_jpeg

    from skuvision.data.decode import ORIENTATIONS, device_orientation, upright

    assert set(ORIENTATIONS) == set(range(1, 9))
    picture = photo((64, 48))
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.jpg"
        if orientation == 1:
            exif = Image.Exif()
            exif[ExifTags.Base.Orientation] = 1
            picture.save(path, quality=95, exif=exif)
        else:
            write_oriented_jpeg(path, picture, orientation)
        data = read_file(str(path))
        assert device_orientation(data) == orientation
        stored = decode_jpeg(data)
        turned = upright(stored, orientation)
        assert torch.equal(turned, decode_jpeg(data, apply_exif_orientation=True)), orientation
        with Image.open(path) as img:
            expected = torch.from_numpy(np.asarray(ImageOps.exif_transpose(img.convert("RGB")))).permute(
                2, 0, 1
            )
            raw = torch.from_numpy(np.asarray(img.convert("RGB"))).permute(2, 0, 1)
        assert torch.equal(upright(raw, orientation), expected), orientation
        assert turned.shape[-2:] == (48, 64)


def device_batch(paths: list[Path], device: torch.device) -> torch.Tensor:
    """decode_on=gpu's steps: worker items (JpegFile), the collated batch, the device decode."""
    files = InputImageFiles(paths, INPUT_224)
    files.jpeg_bytes = True
    items = [files.image(i) for i in range(len(paths))]
    assert all(isinstance(item, JpegFile) for item in items)
    images, _ = collate_images([(item, 0) for item in items])
    return decode_batch_on_device(images, device, ToModelInput(INPUT_224).to(device).resize_crop).cpu()


def test_device_path_turns_phone_photos_upright(tmp_path):
    """decode_on=gpu with the CPU standing in for the device: the JPEG's EXIF orientation travels from the
    worker with its bytes and is applied after decoding."""
    twins = oriented_twins(tmp_path, photo())
    paths = [twins["upright"], twins["oriented"], twins["sideways"]]
    files = InputImageFiles(paths, INPUT_224)
    files.jpeg_bytes = True
    assert [files.image(i).orientation for i in range(3)] == [1, 6, 1]
    batch = device_batch(paths, torch.device("cpu"))
    assert mean_abs_diff(batch[1], batch[0]) < MAX_MEAN_ABS_DIFF
    assert mean_abs_diff(batch[2], batch[0]) > 10
    files.jpeg_bytes = False
    assert mean_abs_diff(batch[1], files.image(1)) < 3  # the PIL path (tensor vs PIL antialiasing)


@pytest.mark.gpu  # nvJPEG decoding; the CPU tests above check the same orientation step
def test_nvjpeg_path_turns_phone_photos_upright(tmp_path):
    twins = oriented_twins(tmp_path, photo())
    paths = [twins["upright"], twins["oriented"], twins["sideways"]]
    on_gpu = device_batch(paths, torch.device("cuda"))
    assert mean_abs_diff(on_gpu[1], on_gpu[0]) < MAX_MEAN_ABS_DIFF
    assert mean_abs_diff(on_gpu[2], on_gpu[0]) > 10
    assert mean_abs_diff(on_gpu[1], device_batch(paths, torch.device("cpu"))[1]) < 3


# --- the pixel budget: what a file would decode to, checked from its header


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory) -> Path:
    """The 0.5 MB, 13000 x 13000 px PNG (under Pillow's bomb limit) that cost 6 s and 2.4 GB per decode."""
    return write_huge_png(tmp_path_factory.mktemp("huge") / "huge.png")


@pytest.fixture(scope="module")
def phone_jpeg(tmp_path_factory) -> Path:
    """A 24 Mpx phone JPEG (6000 x 4000 px, stored turned with Orientation=6): over the 16 Mpx budget in
    full, within it at reduced scale."""
    path = tmp_path_factory.mktemp("phone") / "phone.jpg"
    return write_oriented_jpeg(path, photo((6000, 4000)), 6, quality=90)


@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The size of every image Pillow loads from a file (after any reduction): what was actually decoded."""
    sizes = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        if self.tile:  # something left to decode (a loaded image's load() does nothing)
            sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return sizes


def test_pixel_budget_follows_the_model_input():
    assert eval_pixel_budget(INPUT_32) == eval_pixel_budget(INPUT_224) == 4096 * 4096  # the floor
    assert pixel_budget(1024) == 8192 * 8192  # 8 x the shorter side the eval resize needs, each way
    assert pixel_budget(eval_min_side({**INPUT_224, "input_size": (3, 896, 896)})) == 8192 * 8192


def test_huge_png_is_refused_from_its_header(huge_png, decoded_sizes):
    with pytest.raises(
        ImageOverBudget, match=r"13000x13000 px image decodes to 169,000,000 pixels.* budget of 16,777,216"
    ):
        open_rgb(huge_png, eval_min_side(INPUT_224), "bicubic", eval_pixel_budget(INPUT_224))
    assert decoded_sizes == []  # refused before anything was decoded


def test_a_big_phone_jpeg_decodes_at_reduced_scale_within_the_budget(phone_jpeg, decoded_sizes):
    budget = eval_pixel_budget(INPUT_224)
    image = open_rgb(phone_jpeg, eval_min_side(INPUT_224), "bicubic", budget)
    assert image.size == (384, 256)  # upright: 6000 x 4000 seen, resized to a shorter side of 256
    assert decoded_sizes and all(w * h <= budget for w, h in decoded_sizes)
    assert max(decoded_sizes) == (500, 750)  # the stored 4000 x 6000 at 1/8
    item, error = InputImageFiles([phone_jpeg], INPUT_224)[0]
    assert error == "" and item.shape == (3, 224, 224)
    decoded_sizes.clear()
    with pytest.raises(ImageOverBudget, match="4000x6000 px image decodes to 24,000,000 pixels"):
        open_rgb(phone_jpeg, max_pixels=budget)  # in full it would be over: the budget counts what decodes
    assert decoded_sizes == []


def test_prediction_input_over_the_budget_is_an_error_item(huge_png, phone_jpeg, decoded_sizes):
    files = InputImageFiles([huge_png, phone_jpeg], INPUT_224)
    (blank, error), (image, fine) = files[0], files[1]
    assert error.startswith("ImageOverBudget: 13000x13000 px") and "16,777,216" in error
    assert blank.shape == image.shape == (3, 224, 224) and fine == ""
    assert (13000, 13000) not in decoded_sizes


def test_device_path_leaves_over_budget_and_cmyk_jpegs_to_the_cpu(tmp_path, phone_jpeg):
    from skuvision.data.decode import device_orientation

    data = read_file(str(phone_jpeg))
    assert device_orientation(data) == 6
    assert device_orientation(data, max_pixels=eval_pixel_budget(INPUT_224)) is None  # 24 Mpx in full
    cmyk = tmp_path / "cmyk.jpg"
    photo((300, 200)).convert("CMYK").save(cmyk)
    assert device_orientation(read_file(str(cmyk))) is None
    files = InputImageFiles([phone_jpeg], INPUT_224)
    files.jpeg_bytes = True
    assert files.image(0).shape == (3, 224, 224)  # decoded in the worker, at reduced scale


def test_the_scan_skips_files_over_the_budget_without_decoding_them(tmp_path, decoded_sizes):
    """The unreadable-file scan reads the budget off each file's (cached) header: a file over this model's
    budget is reported without being decoded, one under a later, larger budget is decoded then."""
    png = tmp_path / "wide.png"
    Image.new("RGB", (3000, 2000)).save(png)  # 6 Mpx
    reason = scan_images(tmp_path, [png], max_pixels=2_000_000)[png]
    assert "3000x2000 px image decodes to 6,000,000 pixels" in reason and "2,000,000" in reason
    assert decoded_sizes == []
    assert scan_images(tmp_path, [png], max_pixels=None) == {}  # decoded now
    assert decoded_sizes == [(3000, 2000)]
    assert png in scan_images(tmp_path, [png], max_pixels=2_000_000)  # from the cache: no decode again
    assert scan_images(tmp_path, [png]) == {} and decoded_sizes == [(3000, 2000)]


def test_training_skips_an_image_over_the_budget_and_lists_why(
    tmp_path, data_root, huge_png, phone_jpeg, decoded_sizes
):
    import json
    import shutil

    from tests.writers import write_image_folder

    root = write_image_folder(tmp_path / "shop", classes=("kettle", "shirt"), per_class=6, size=40)
    shutil.copy(huge_png, root / "shirt" / "huge.png")
    shutil.copy(phone_jpeg, root / "kettle" / "phone.jpg")
    overrides = quick_overrides("image_folder", data_root) + [
        f"data.root={root}",
        "trainer.fast_dev_run=true",
        "test=false",
    ]
    train(compose_cfg("train", overrides, tmp_path / "run"))
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert list(skipped) == [str(root / "shirt" / "huge.png")]
    assert "13000x13000 px image decodes to 169,000,000 pixels" in skipped[str(root / "shirt" / "huge.png")]
    counts = json.loads((tmp_path / "run" / "class_counts.json").read_text())
    assert sum(sum(split.values()) for split in counts.values()) == 13  # the phone photo is used
    assert (13000, 13000) not in decoded_sizes


# --- what the model answers: predict.py and the server's decoding, with a trained checkpoint


def pattern_photo() -> Image.Image:
    """A picture of one class of the serving tests' model (a bright horizontal bar on noise), at a photo's
    aspect: turned sideways the bar stands upright, and the model sees another picture."""
    from tests.writers import pattern_images

    bar = pattern_images(np.array([1]), 40, 3, seed=5)[0]
    return Image.fromarray(bar).resize((200, 160), Image.BICUBIC)


def label_probs(labels: list[dict]) -> dict[str, float]:
    return {item["label"]: item["prob"] for item in labels}


def csv_probs(row: dict) -> dict[str, float]:
    ranks = range(1, 1 + sum(key.startswith("label_") for key in row))
    return {row[f"label_{i}"]: float(row[f"prob_{i}"]) for i in ranks}


def max_prob_change(a: dict[str, float], b: dict[str, float]) -> float:
    assert set(a) == set(b)
    return max(abs(a[k] - b[k]) for k in a)


@pytest.fixture(scope="module")
def predicted_rows(serve_checkpoint, huge_png, tmp_path_factory) -> dict[str, dict]:
    """predict.py over a folder holding the phone-photo twins and the huge PNG: its CSV rows by file."""
    import csv
    import shutil

    from skuvision.tasks.predict import predict

    folder = tmp_path_factory.mktemp("predict_inputs") / "new"
    oriented_twins(folder, pattern_photo())
    shutil.copy(huge_png, folder / "huge.png")
    overrides = [
        f"ckpt_path={serve_checkpoint}",
        f"input={folder}",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
    ]
    with open(predict(compose_cfg("predict", overrides, folder.parent / "run"))) as f:
        return {Path(row["path"]).stem.split("_")[0]: row for row in csv.DictReader(f)}


def test_predict_sees_a_phone_photo_as_its_upright_twin(predicted_rows):
    upright, oriented = csv_probs(predicted_rows["upright"]), csv_probs(predicted_rows["oriented"])
    assert predicted_rows["oriented"]["error"] == "" and oriented
    assert predicted_rows["oriented"]["label_1"] == predicted_rows["upright"]["label_1"]
    assert max_prob_change(oriented, upright) < 0.02
    assert max_prob_change(csv_probs(predicted_rows["sideways"]), upright) > 0.1  # the model can tell


def test_predict_gives_an_image_over_the_budget_its_error_row(predicted_rows):
    row = predicted_rows["huge"]
    assert row["error"].startswith("ImageOverBudget: 13000x13000 px image decodes to 169,000,000 pixels")
    assert "16,777,216" in row["error"] and row["label_1"] == ""


@pytest.fixture(scope="module")
def predictor(serve_checkpoint):
    from skuvision.serving.predictor import Predictor, model_card

    return Predictor(model_card(str(serve_checkpoint)))


def test_server_decoding_refuses_an_image_over_the_budget_with_413(predictor, huge_png, decoded_sizes):
    from skuvision.serving.predictor import BadImage

    with pytest.raises(
        BadImage, match=r"13000x13000 px image decodes to .* pixel budget of 16,777,216"
    ) as err:
        predictor.decode(huge_png.read_bytes())
    assert err.value.status == 413
    assert decoded_sizes == []
    with pytest.raises(BadImage) as bomb:  # over Pillow's own ceiling: still the 400 it was
        predictor.decode(write_huge_png(huge_png.with_name("bomb.png"), 14000, 14000).read_bytes())
    assert bomb.value.status == 400 and "DecompressionBombError" in str(bomb.value)


def test_server_decoding_sees_a_phone_photo_as_its_upright_twin(predictor, tmp_path, phone_jpeg):
    twins = oriented_twins(tmp_path, pattern_photo())
    images = {name: predictor.decode(path.read_bytes()) for name, path in twins.items()}
    assert mean_abs_diff(images["oriented"], images["upright"]) < MAX_MEAN_ABS_DIFF
    answers = predictor.answer(torch.stack([images["upright"], images["oriented"], images["sideways"]]))
    upright, oriented, sideways = (label_probs(a["labels"]) for a in answers)
    assert max_prob_change(oriented, upright) < 0.02
    assert max_prob_change(sideways, upright) > 0.1
    big = predictor.decode(phone_jpeg.read_bytes())  # a 24 Mpx phone JPEG is answered, upright
    assert big.shape == (3, 32, 32)
    upright_phone = InputImageFiles([phone_jpeg], predictor.card.input_config)[0][0]
    assert torch.equal(big, upright_phone)


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # its first directory lies past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12",  # cut inside an entry
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x09\x00\x00\x00",  # 9
    ],
)
def test_broken_or_unknown_exif_orientation_leaves_the_image_as_stored(tmp_path, exif):
    from skuvision.data.decode import device_orientation

    path = tmp_path / "odd_exif.jpg"
    photo((640, 480)).save(path, quality=95, exif=exif)
    plain = tmp_path / "plain.jpg"
    photo((640, 480)).save(plain, quality=95)
    for args in ((), (eval_min_side(INPUT_32), "bicubic")):
        assert np.array_equal(np.asarray(open_rgb(path, *args)), np.asarray(open_rgb(plain, *args)))
    assert device_orientation(read_file(str(path))) == 1


# --- input.crop_mode on every decode path -------------------------------------------------------------------
CROP_MODES = ("center", "squash", "border")


@pytest.mark.parametrize("size", [(1001, 1333), (1333, 1001)])
@pytest.mark.parametrize("crop_mode", ["squash", "border"])
def test_reduced_scale_decoding_matches_full_decoding_for_every_crop_mode(tmp_path, size, crop_mode):
    """The reduced decode is resized to the mode's own geometry (for border a center-mode pre-resize lands a
    pixel off: a mean difference of about 5)."""
    config = {**INPUT_224, "crop_mode": crop_mode}
    transform, min_side = eval_image_transform(config), eval_min_side(config)
    assert dct_scale(*size, min_side) > 1
    for name in ("astronaut", "chelsea"):
        path = large_photo(tmp_path, getattr(photos, name)(), size, name)
        full = transform(open_rgb(path))
        reduced = transform(open_rgb(path, min_side, "bicubic", crop_mode=crop_mode))
        assert mean_abs_diff(reduced, full) < MAX_MEAN_ABS_DIFF, name


@pytest.mark.parametrize("crop_mode", CROP_MODES)
def test_reduced_size_is_what_the_eval_resize_makes_in_every_crop_mode(crop_mode):
    """open_rgb resizes a reduced JPEG to the size timm's first eval step (Resize, or ResizeKeepRatio for
    border) makes of the full image, so that step has nothing left to do."""
    resize = eval_image_transform({**INPUT_224, "crop_mode": crop_mode}).transforms[0]
    for width, height in [(1333, 1001), (1001, 1333), (1600, 1000), (257, 256), (999, 1000), (600, 800)]:
        expected = eval_resize_size(width, height, 256, crop_mode)
        assert resize(Image.new("RGB", (width, height))).size == expected


@pytest.mark.parametrize("crop_mode", CROP_MODES)
def test_no_crop_mode_upsamples_what_reduced_decoding_keeps(crop_mode):
    """eval_min_side, the shorter side reduced decoding keeps, is enough for every mode and aspect ratio:
    border only needs the longer side to reach S, squash and center the shorter. (A file already smaller
    than that is decoded in full and upsampled by the transform itself, as timm does.)"""
    side = eval_min_side({**INPUT_224, "crop_mode": crop_mode})
    reduced = 0
    for width in range(200, 3000, 61):
        for height in (width // 3, 3 * width // 4, width, 4 * width // 3, 3 * width):
            scale = dct_scale(width, height, side)
            decoded = (-(-width // scale), -(-height // scale))
            target = eval_resize_size(width, height, side, crop_mode)
            if scale > 1:
                reduced += 1
                assert decoded[0] >= target[0] and decoded[1] >= target[1], (width, height, scale)
    assert reduced > 100


@pytest.mark.parametrize("crop_mode", CROP_MODES)
def test_every_decode_path_keeps_a_portrait_photo_whole_as_its_crop_mode_says(tmp_path, crop_mode):
    """A 600x800 JPEG with red bands top and bottom, stored upright and as a phone stores it (turned, with
    its EXIF tag): the per-image path (reduced decode), the device path (full decode, batched resize) and a
    full decode through timm's transform give the same picture, cropped, squashed or padded."""
    config = {**INPUT_32, "crop_pct": 1.0, "crop_mode": crop_mode}
    twins = oriented_twins(tmp_path, banded_portrait(600, 800, band=60))
    paths = [twins["upright"], twins["oriented"]]
    files = InputImageFiles(paths, config)
    assert dct_scale(600, 800, files.min_side) == 8
    per_image = [files[i][0] for i in range(2)]
    files.jpeg_bytes = True
    images, _ = collate_images([(files.image(i), 0) for i in range(2)])
    device = decode_batch_on_device(images, torch.device("cpu"), ToModelInput(config).resize_crop)
    full = eval_image_transform(config)(open_rgb(twins["upright"]))
    for image in [*per_image, *device]:
        assert image.shape == (3, 32, 32) and mean_abs_diff(image, full) < MAX_MEAN_ABS_DIFF
        red = red_pixels(image)
        if crop_mode == "center":
            assert not red.any()
        elif crop_mode == "squash":
            assert red[0].all() and red[-1].all()
        else:  # 600x800 fitted into 32x32 is 24x32: 4 columns of padding each side, timm's fill (the mean)
            fill = torch.tensor([round(255 * m) for m in config["mean"]], dtype=torch.uint8).view(3, 1, 1)
            assert red[0, 4:28].all() and red[-1, 4:28].all()
            assert (image[:, :, :4] == fill).all() and (image[:, :, 28:] == fill).all()


def test_decoded_cache_keys_differ_by_crop_mode_and_center_keeps_its_key():
    """A cache filled for center is never read for squash or border (nor border's for another padding
    value); center caches written before crop_mode existed are still found."""
    import hashlib
    import json

    import PIL
    import torchvision

    from skuvision.data.decode_cache import geometry_key

    before = {  # what format 2 hashed before crop_mode
        "format": 2,
        "input_size": [224, 224],
        "crop_pct": 0.875,
        "interpolation": "bicubic",
        "channels": 3,
        "decode": "pillow-dct-draft-exif",
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,
    }
    old_key = hashlib.sha1(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    keys = {mode: geometry_key({**INPUT_224, "crop_mode": mode}, 3) for mode in CROP_MODES}
    assert keys["center"] == geometry_key(INPUT_224, 3) == old_key
    assert len(set(keys.values())) == 3
    assert geometry_key({**INPUT_224, "crop_mode": "border", "mean": (0.5, 0.5, 0.5)}, 3) != keys["border"]
    assert geometry_key({**INPUT_224, "crop_mode": "squash", "mean": (0.5, 0.5, 0.5)}, 3) == keys["squash"]
