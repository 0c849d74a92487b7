"""Images named by path, for prediction and embedding: a folder, a file, a list file, or a list of paths.

An unreadable file does not stop the run: it yields a blank image and its error, which the caller reports
in its own row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from pytorch_lightning import LightningDataModule
from torch.utils.data import DataLoader

from skuvision.data.image_cache import DecodedImageCache
from skuvision.data.image_files import ImageFiles
from skuvision.data.image_folder import IMAGE_SUFFIXES
from skuvision.data.images import DECODE_ERRORS
from skuvision.data.transforms import ToModelInput, eval_image_transform, eval_min_side, eval_pixel_budget
from skuvision.errors import SkuvisionError

LIST_SUFFIXES = {".txt", ".csv", ".lst"}


def collect_inputs(inputs: str | Sequence[str]) -> list[Path]:
    """Image paths from a folder (recursively), an image file, a text file with one path per line, or a list
    of any of these; in a stable order. A broken symbolic link in a folder is kept, for its error row."""
    items = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    paths: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += sorted(
                p
                for p in path.rglob("*")
                if (p.is_file() or broken_link(p))
                and p.suffix.lower() in IMAGE_SUFFIXES
                and not p.name.startswith(".")
            )
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            lines = [line.strip().split(",")[0] for line in path.read_text().splitlines() if line.strip()]
            paths += [Path(line).expanduser() for line in lines]
        else:
            paths.append(path)  # a missing or unreadable file becomes an error row, not a crash
    if not paths:
        raise SkuvisionError(f"input={inputs}: no image files found; give a folder, an image, or a list file")
    return paths


class InputImageFiles(ImageFiles):
    """Unlabelled files to predict or embed: (uint8 CHW tensor at the model's size, error message or "")
    per path, so that one bad file (or one over the model's pixel budget) becomes an error row instead of
    stopping the run."""

    def __init__(self, paths: list[Path], input_config: dict):
        super().__init__(paths, eval_image_transform(input_config))
        self.input_config = input_config
        self.channels = int(input_config["input_size"][0])
        self.min_side = eval_min_side(input_config)
        self.interpolation = input_config["interpolation"]
        self.max_pixels = eval_pixel_budget(input_config)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        channels, size, _ = self.input_config["input_size"]
        try:
            return self.image(index), ""
        except DECODE_ERRORS as err:
            error = broken_link(self.paths[index]) or f"{type(err).__name__}: {err}"
            return torch.zeros(channels, size, size, dtype=torch.uint8), error[:200]


def broken_link(path) -> str | None:
    """What is wrong with a symbolic link that leads to no file (dangling, or a loop); None otherwise."""
    if not os.path.islink(path):
        return None
    try:
        os.stat(path)
    except OSError as err:
        return f"symbolic link to {os.readlink(path)}: {err.strerror}"
    return None


class InputFilesDataModule(LightningDataModule):
    """Batches of files for Trainer.predict, normalized on the device like the training data.

    `cache`: read and fill the decoded-image cache (see skuvision.data.image_cache)."""

    def __init__(
        self,
        paths: list[Path],
        input_config: dict,
        batch_size: int = 64,
        num_workers: int = 2,
        cache: bool = False,
    ):
        super().__init__()
        self.dataset = InputImageFiles(paths, input_config)
        self.to_model_input = ToModelInput(input_config)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache = cache

    def setup(self, stage: str | None = None) -> None:
        if self.cache and self.dataset.cached is None:
            store = DecodedImageCache(self.dataset.input_config, self.dataset.channels)
            self.dataset.cached = store.fill(self.dataset, workers=max(2, self.num_workers))

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset, batch_size=self.batch_size, num_workers=self.num_workers, shuffle=False
        )

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        images, errors = batch
        return self.to_model_input(images), errors
