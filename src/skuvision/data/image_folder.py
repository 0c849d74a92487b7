"""A folder of the user's own photos: class subfolders, either under train/ val/ test/ or split by seed.

Real folders are messy. Files that are not images (by suffix, or hidden like .DS_Store) are ignored. Files
that do not decode (truncated, empty, text named .jpg) are found at setup, skipped with a warning, and
listed in `skipped`, which the train task writes to the run folder. Class indices follow the sorted class
folder names of the training split.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path

from skuvision.data.datamodule import SPLITS, ImageDataModule, checked_split_fractions, stratified_split
from skuvision.data.datasets import LabelledImageFiles
from skuvision.data.decode import IMAGE_SUFFIXES
from skuvision.errors import SkuvisionError

log = logging.getLogger(__name__)


def list_images(class_dir: Path) -> list[Path]:
    """Image files by suffix, hidden files left out, in a stable order."""
    return sorted(
        p
        for p in class_dir.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


class ImageFolderDataModule(ImageDataModule):
    """`root/train|val|test/<class>/*.jpg`, or `root/<class>/*.jpg` split by `split_fractions`, stratified."""

    def __init__(
        self, root: str, input_config: dict, split_fractions: Sequence[float] = (0.8, 0.1, 0.1), **kwargs
    ):
        super().__init__(root=root, input_config=input_config, **kwargs)
        self.split_fractions = checked_split_fractions(split_fractions)

    @cached_property
    def folder(self) -> Path:
        folder = Path(self.root).expanduser()
        if not folder.is_dir():
            raise SkuvisionError(
                f"data.root={self.root} is not a folder. Point data.root at a folder of class subfolders "
                f"(root/<class>/*.jpg) or of train/, val/, test/ subfolders."
            )
        return folder

    @cached_property
    def presplit(self) -> bool:
        return (self.folder / "train").is_dir()

    @cached_property
    def class_names(self) -> list[str]:
        base = self.folder / "train" if self.presplit else self.folder
        names = class_folders(base)
        if len(names) < 2:
            found = f"only {base / names[0]}" if names else "none"
            raise SkuvisionError(
                f"{base} needs at least two class subfolders (<class name>/<images>) to train a classifier; "
                f"found {found}"
            )
        return names

    def _samples(self, base: Path, split: str) -> list[tuple[Path, int]]:
        """Readable images under base/<class>/, checking the class folders against the training classes."""
        index = {name: i for i, name in enumerate(self.class_names)}
        files: dict[str, list[Path]] = {}
        for name in class_folders(base):
            if name not in index:
                raise SkuvisionError(
                    f"class folder {base / name} is not among the training classes {self.class_names}; "
                    f"add it to train/ or remove it"
                )
            files[name] = list_images(base / name)
        bad = self.find_unreadable(self.folder, [p for paths in files.values() for p in paths])
        for path, reason in bad.items():
            log.warning("skipping unreadable image %s (%s)", path, reason)
            self.skipped[str(path)] = reason
        samples = []
        for name in self.class_names:
            good = [p for p in files.get(name, []) if p not in bad]
            if not good:
                where = base / name
                if split == "train":
                    raise SkuvisionError(
                        f"class folder {where} has no readable images; add images or remove the folder"
                    )
                log.warning("class %r has no images in the %s split (%s)", name, split, where)
            samples += [(p, index[name]) for p in good]
        return samples

    def warn_if_split_part(self) -> None:
        """data.root naming the train/ (or val/, test/) of a split folder would be split again by fraction,
        and the folder's own val and test never seen."""
        folder = self.folder.resolve()
        parent = folder.parent
        if folder.name in SPLITS and all((parent / s).is_dir() for s in SPLITS):
            log.warning(
                "data.root=%s is the %s/ folder of %s, which has train/, val/ and test/: it is split again "
                "by data.split_fractions and the folder's own val/ and test/ are never used; to train on "
                "that split, use data.root=%s",
                self.root,
                folder.name,
                parent,
                parent,
            )

    def load_splits(self) -> dict[str, LabelledImageFiles]:
        self.skipped = {}
        if self.presplit:
            missing = [s for s in SPLITS if not (self.folder / s).is_dir()]
            if missing:
                raise SkuvisionError(f"{self.folder} has train/ but not {', '.join(missing)}/; add them")
            return {s: LabelledImageFiles(self._samples(self.folder / s, s)) for s in SPLITS}
        self.warn_if_split_part()
        samples = self._samples(self.folder, "train")
        labels = [label for _, label in samples]
        parts = stratified_split(labels, self.split_fractions, self.seed)
        for split, idx in zip(SPLITS, parts, strict=True):
            absent = sorted(set(self.class_names) - {self.class_names[labels[i]] for i in idx})
            if absent and len(idx):
                log.warning(
                    "classes %s have no images in the %s split: too few images to split", absent, split
                )
        return {
            s: LabelledImageFiles([samples[i] for i in idx]) for s, idx in zip(SPLITS, parts, strict=True)
        }
