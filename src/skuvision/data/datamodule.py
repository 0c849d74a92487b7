"""The DataModule every source shares: splits, subsets, loaders, the batched normalization step, and what
callers read of a source's splits (labels, file paths, skipped files, the data report)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Subset, WeightedRandomSampler

from skuvision.data.augment import TrainAugment
from skuvision.data.datasets import ImageFiles, InMemoryImages, dataset_labels, dataset_paths, keep_batch
from skuvision.data.decode import DECODE_ON, JpegBatch, collate_images, decode_batch_on_device, scan_images
from skuvision.data.decode_cache import DecodedImageCache
from skuvision.data.transforms import (
    ToModelInput,
    crop_mode,
    eval_image_transform,
    eval_min_side,
    eval_pixel_budget,
)
from skuvision.errors import SkuvisionError

log = logging.getLogger(__name__)

BALANCE_MODES = ("none", "sampler", "loss")
SPLITS = ("train", "val", "test")


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Seeded split of indices into len(fractions) parts, each class divided in the same proportions."""
    labels = np.asarray(labels)
    total = sum(fractions)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for cls in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        bounds = np.round(np.cumsum(fractions) / total * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, bounds[:-1]), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) if p else np.array([], dtype=int) for p in parts]


def subset_indices(labels: Sequence[int], subset: float | int | None, seed: int) -> np.ndarray:
    """All indices, or a seeded stratified subset: a fraction (0, 1] or an absolute count."""
    n = len(labels)
    if subset is None:
        return np.arange(n)
    count = round(subset * n) if isinstance(subset, float) and subset <= 1 else int(subset)
    if count >= n:
        return np.arange(n)
    if count <= 0:
        raise SkuvisionError(f"data.subset={subset} leaves no samples; use a fraction in (0, 1] or a count")
    return stratified_split(labels, [count, n - count], seed)[0]


def labelled_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    """Images per class; -1 (no label in this column) is not counted."""
    labels = np.asarray(labels, dtype=int)
    return np.bincount(labels[labels >= 0], minlength=num_classes).tolist()


def checked_split_fractions(fractions: Sequence[float]) -> list[float]:
    """data.split_fractions (train, val, test) of a source split by seed, as floats; refused unless usable."""
    if len(fractions) != 3 or min(fractions) < 0 or sum(fractions) <= 0:
        raise SkuvisionError(f"data.split_fractions={list(fractions)} must be three non-negative numbers")
    return [float(f) for f in fractions]


class ImageDataModule(LightningDataModule):
    """Shared by every source: subclasses set `in_chans`, and implement `class_names` and `load_splits`
    (and `fetch_missing` where the source can be downloaded). File sources list each file or row they leave
    out in `skipped` ({file or row: why}); the train task writes it, through `data_report`, to the run folder.

    `input_config` (size, mean/std, interpolation, crop), resolved from the model config before this is
    built, fixes every transform here. `batch_size` is the global batch, divided among the processes of a DDP
    run, so the recipe does not change with the number of GPUs; `eval_batch_size` is global too (rounded up
    per process: it changes no result).
    """

    in_chans = 3

    def __init__(
        self,
        root: str,
        input_config: dict,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        subset: float | int | None = None,
        seed: int = 42,
        download: bool = True,
        balance: str = "none",
        augment: TrainAugment | None = None,
        predict_split: str = "test",
        cache: bool = False,
        decode_on: str = "cpu",
    ):
        """`balance`: "none", "sampler" (class-balanced sampling of the training split) or "loss"
        (class-weighted cross-entropy, see `loss_class_weights`). `augment`: a training augmentation preset
        (conf/augment, see skuvision.data.augment); evaluation batches are never augmented.
        `predict_split`: the split Trainer.predict runs over. File sources only: `cache` keeps each image
        decoded once (skuvision.data.decode_cache); `decode_on="gpu"` decodes JPEG batches on the device."""
        super().__init__()
        self.root = root
        self.input_config = dict(input_config)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.subset = subset
        self.seed = seed
        self.download = download
        if balance not in BALANCE_MODES:
            raise SkuvisionError(f"data.balance={balance!r}: use one of {', '.join(BALANCE_MODES)}")
        if getattr(augment, "needs_even_batch", False):
            if balance == "loss":
                raise SkuvisionError(
                    "data.balance=loss cannot weight the soft targets of augment=mixup_cutmix; "
                    "use data.balance=sampler"
                )
            if batch_size % 2:
                raise SkuvisionError(f"augment=mixup_cutmix needs an even data.batch_size, not {batch_size}")
        if decode_on not in DECODE_ON:
            raise SkuvisionError(f"data.decode_on={decode_on!r}: use one of {', '.join(DECODE_ON)}")
        self.balance = balance
        self.cache = bool(cache)
        self.decode_on = decode_on
        self.augment = augment
        self.predict_split = predict_split
        self.to_model_input = ToModelInput(self.input_config)
        self.eval_transform = eval_image_transform(self.input_config)
        self.train_transform = augment.image_transform(self.input_config) if augment else None
        self.splits: dict[str, Dataset] = {}
        self.skipped: dict[str, str] = {}  # file or row -> why it was left out

    # --- what subclasses provide ---------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    def load_splits(self) -> dict[str, Dataset]:
        """Return {"train": ..., "val": ..., "test": ...} datasets yielding (uint8 CHW tensor, label)."""
        raise NotImplementedError

    def fetch_missing(self) -> None:
        """Download missing files where the network allows (sources that cannot be downloaded do nothing)."""

    # --- shared --------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def heads(self) -> list[dict] | None:
        """Head specs of a table with several label or tag columns (skuvision.models.heads); None where the
        source has one label per image, `class_names`."""
        return None

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, before any process reads the files.
        if self.download:
            self.fetch_missing()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits = self.load_splits()
        for split, dataset in splits.items():
            self._check_in_memory(split, dataset)
        self.splits = {name: self._apply_subset(ds) for name, ds in splits.items()}
        if hasattr(self.augment, "set_num_classes"):
            self.augment.set_num_classes(self.num_classes)
        for split, dataset in self.splits.items():
            base = dataset.dataset if isinstance(dataset, Subset) else dataset
            per_image = self.train_transform if split == "train" else None
            # In-memory images are resized on the batch unless a per-image augmentation needs PIL.
            eval_transform = None if isinstance(base, InMemoryImages) else self.eval_transform
            base.transform = per_image or eval_transform
            if isinstance(base, ImageFiles):
                self._configure_files(split, dataset, base, augmented=per_image is not None)
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        log.info(
            "data: %s, %d classes, %s; training images on the %s",
            type(self).__name__,
            self.num_classes,
            sizes,
            self.training_path,
        )
        for split, counts in self.class_counts().items():
            log.info("class counts %s: %s", split, dict(zip(self.class_names, counts, strict=True)))

    def _check_in_memory(self, split: str, dataset: Dataset) -> None:
        """The batched path gathers (N, C, H, W) uint8 images by index: refuse anything else at once."""
        images = dataset.images if isinstance(dataset, InMemoryImages) else None
        if images is not None and (images.dtype != torch.uint8 or images.ndim != 4):
            raise SkuvisionError(
                f"{type(self).__name__} (data._target_) gave {images.dtype} images of shape "
                f"{tuple(images.shape)} for the {split} split; in-memory images are uint8 (N, C, H, W)"
            )

    @cached_property
    def device_decoding(self) -> bool:
        """decode_on=gpu where a CUDA device exists; else the CPU path, said once."""
        if self.decode_on != "gpu":
            return False
        if not torch.cuda.is_available():
            log.info("data.decode_on=gpu: no CUDA device here; JPEGs are decoded on the CPU instead")
            return False
        return True

    @property
    def pixel_budget(self) -> int:
        """The most pixels one file may decode to, from the model's input size (decode.pixel_budget)."""
        return eval_pixel_budget(self.input_config)

    @property
    def largest_decode_side(self) -> int | None:
        """The shorter side the most demanding split decodes files at (None: in full)."""
        if self.train_transform is None:
            return eval_min_side(self.input_config)
        train_side = self.augment.min_decode_side(self.input_config)
        return None if train_side is None else max(train_side, eval_min_side(self.input_config))

    def find_unreadable(self, root: Path, paths: list[Path]) -> dict[Path, str]:
        """{path: reason} for the files of a file source that do not decode, or that would decode to more
        pixels than the budget in some split: found once, at setup, and skipped."""
        return scan_images(
            root,
            paths,
            workers=max(2, self.num_workers),
            min_side=self.largest_decode_side,
            max_pixels=self.pixel_budget,
        )

    def _configure_files(self, split: str, dataset: Dataset, base: ImageFiles, augmented: bool) -> None:
        """Decoding of a file split: reduced-scale JPEGs within the pixel budget always; the cache or device
        decoding where the split uses the eval geometry (a per-image training augmentation needs the whole
        decoded image)."""
        base.max_pixels = self.pixel_budget
        if augmented:
            base.min_side = self.augment.min_decode_side(self.input_config)
            if self.cache or self.decode_on == "gpu":
                log.info(
                    "data.cache/decode_on: the %s split's per-image augmentation needs whole images; it is "
                    "decoded per epoch in the DataLoader workers",
                    split,
                )
            return
        base.min_side = eval_min_side(self.input_config)
        base.interpolation = self.input_config["interpolation"]
        base.crop_mode = crop_mode(self.input_config)
        if self.cache:
            indices = dataset.indices if isinstance(dataset, Subset) else None
            store = DecodedImageCache(self.input_config, base.channels)
            base.cached = store.fill(base, indices, workers=max(2, self.num_workers), split=split)
        elif self.decode_on == "gpu":
            base.jpeg_bytes = self.device_decoding

    @property
    def training_path(self) -> str:
        """How training batches are made, read off the training split itself."""
        train = self.splits["train"]
        base = train.dataset if isinstance(train, Subset) else train
        if isinstance(base, InMemoryImages) and base.transform is None:
            return "in-memory batched path (resized on the device)"
        if isinstance(base, ImageFiles) and base.cached is not None:
            return "decoded-image cache (memory-mapped uint8, DataLoader workers)"
        if isinstance(base, ImageFiles) and base.jpeg_bytes:
            return "JPEG bytes read in DataLoader workers, decoded on the device"
        return "per-image PIL path (DataLoader workers, JPEGs decoded at reduced scale)"

    def class_counts(self) -> dict[str, list[int]]:
        """Images per class in each split, in class-index order."""
        self.setup()
        return {
            split: labelled_counts(dataset_labels(ds), self.num_classes) for split, ds in self.splits.items()
        }

    def split_labels(self, split: str) -> list[int]:
        """Labels of a split's images, in order, without decoding them."""
        return dataset_labels(self.splits[split])

    def sample_paths(self, split: str) -> list[str] | None:
        """File paths of a split's images, in order; None where they are not files of their own (in-memory
        sets, shard streams)."""
        return dataset_paths(self.splits[split])

    def data_report(self) -> dict:
        """What a run records of its data: {"class_counts": {split: {class name: images}}, "skipped": {file
        or row: why it was left out}}."""
        counts = self.class_counts()
        return {
            "class_counts": {
                split: dict(zip(self.class_names, c, strict=True)) for split, c in counts.items()
            },
            "skipped": dict(self.skipped),
        }

    def loss_class_weights(self) -> list[float] | None:
        """With balance="loss": N / (K * count_k) per class of the training split, else None."""
        if self.balance != "loss":
            return None
        counts = np.asarray(self.class_counts()["train"], dtype=float)
        if (counts == 0).any():
            missing = [n for n, c in zip(self.class_names, counts, strict=True) if c == 0]
            raise SkuvisionError(f"data.balance=loss: no training images for class(es) {missing}")
        return (counts.sum() / (len(counts) * counts)).tolist()

    def _train_sampler(self, dataset: Dataset) -> WeightedRandomSampler | None:
        if self.balance != "sampler":
            return None
        labels = np.asarray(dataset_labels(dataset), dtype=int)
        counts = np.asarray(labelled_counts(labels, self.num_classes), dtype=float)
        # A row without a label (a table's other heads train on it) is drawn like an average class's row.
        weights = np.where(labels >= 0, 1.0 / counts[labels.clip(min=0)], len(counts) / counts.sum())
        return WeightedRandomSampler(
            torch.as_tensor(weights, dtype=torch.double), len(labels), replacement=True
        )

    def _apply_subset(self, dataset: Dataset) -> Dataset:
        if self.subset is None:
            return dataset
        labels = dataset_labels(dataset)
        keep = subset_indices(labels, self.subset, self.seed)
        if isinstance(dataset, InMemoryImages):
            return dataset.subset(keep)
        return Subset(dataset, keep.tolist())

    def split_train_val(self, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        if not 0 < self.val_fraction < 1:
            raise SkuvisionError(f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        train, val = stratified_split(labels, [1 - self.val_fraction, self.val_fraction], self.seed)
        return train, val

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        if split not in self.splits:
            self.setup()
        dataset = self.splits[split]
        in_memory = isinstance(dataset, InMemoryImages)
        base = dataset.dataset if isinstance(dataset, Subset) else dataset
        jpeg_bytes = isinstance(base, ImageFiles) and base.jpeg_bytes
        batched = in_memory and dataset.transform is None  # a gather by index: no worker processes needed
        training = split == "train"
        sampler = self._train_sampler(dataset) if training else None
        workers = 0 if batched else self.num_workers
        batch_size = self.per_process_batch_size() if training else self.per_process_eval_batch_size()
        # BatchNorm cannot train on a batch of one image: a last training batch of one is left out.
        lone_last = -(-len(dataset) // self.num_processes) % batch_size == 1
        even_only = getattr(self.augment, "needs_even_batch", False)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            drop_last=training and (even_only or lone_last),
            num_workers=workers,
            collate_fn=keep_batch if in_memory else collate_images if jpeg_bytes else None,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    @property
    def num_processes(self) -> int:
        """DDP processes sharing each batch: devices x nodes (1 outside a Trainer)."""
        return self.trainer.world_size if self.trainer is not None else 1

    def per_process_batch_size(self, processes: int | None = None) -> int:
        processes = processes or self.num_processes
        if self.batch_size % processes:
            raise SkuvisionError(
                f"data.batch_size={self.batch_size} is the global batch and must divide evenly among "
                f"{processes} processes (trainer.devices x trainer.num_nodes): use a multiple of {processes}"
            )
        per_process = self.batch_size // processes
        if getattr(self.augment, "needs_even_batch", False) and per_process % 2:
            raise SkuvisionError(
                f"augment=mixup_cutmix needs an even batch per process, not {per_process}: "
                f"use a data.batch_size that is a multiple of {2 * processes}"
            )
        return per_process

    def per_process_eval_batch_size(self) -> int:
        return -(-self.eval_batch_size // self.num_processes)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        """`predict_split`, in order."""
        return self._loader(self.predict_split, shuffle=False)

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        if isinstance(images, JpegBatch):  # decode_on=gpu: decoded on the training device
            device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
            images = decode_batch_on_device(images, device, self.to_model_input.resize_crop, self.in_chans)
        return images, labels

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, labels = batch
        augment = self.augment if self.trainer is not None and self.trainer.training else None
        x = self.to_model_input.to_unit(images)
        if augment is not None:
            x = augment.on_batch(x)
        x = self.to_model_input.normalize(x)
        if augment is not None:
            x, labels = augment.after_normalize(x, labels)
        return x, labels
