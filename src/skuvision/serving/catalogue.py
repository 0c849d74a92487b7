"""The catalogue behind similar-item answers: embed.py's index, and pictures of its items for the demo page.

Pictures come only from the index's own items (a file it lists, or an item of the split it embedded), so the
demo never opens a path a request names. Answers name a file item by its path relative to the catalogue's
root (the deepest folder holding every file the index lists), never by where it lies on the server.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from PIL import Image
from torchvision.transforms.v2.functional import to_pil_image

from skuvision.assembly import data_module
from skuvision.data.decode import DECODE_ERRORS, open_rgb
from skuvision.errors import SkuvisionError

log = logging.getLogger("skuvision")

SPLIT_ITEM = re.compile(r"^(?P<split>\w+)\[(?P<index>\d+)\]$")  # how embed.py names in-memory split items
THUMBNAIL = 160


def index_folder(path: str | Path) -> Path:
    """`index=`: an embed.py run folder (its index/ subfolder is used) or the index folder itself."""
    folder = Path(path).expanduser()
    for candidate in (folder / "index", folder):
        if candidate.is_dir() and candidate.name == "index":
            return candidate.resolve()
    raise SkuvisionError(
        f"index={folder}: no index/ folder there; build one with `python embed.py ckpt_path=...` and give "
        "its run folder"
    )


def catalogue_root(items: list[str]) -> str | None:
    """The deepest folder that holds every file item listed by absolute path (None when there are none)."""
    folders = [os.path.dirname(item) for item in items if os.path.isabs(item)]
    return os.path.commonpath(folders) if folders else None


def public_name(item: str, root: str | None) -> str:
    """How an answer names an index item: a file relative to the catalogue's root; a split item (`test[3]`)
    or a relative path as the index lists it."""
    return os.path.relpath(item, root) if root and os.path.isabs(item) else item


def load_index(folder: str | Path):
    from skuvision.index import CatalogueIndex

    return CatalogueIndex.load(folder)


class CatalogueImages:
    """Pictures of index items by row, thumbnails by item id (items.csv's, as answers give them): files are
    opened from the index's list, split items from the data set the model was trained on (`data`, its data
    config)."""

    def __init__(self, index, data: dict, input_config: dict):
        self.items = list(index.items)
        self.rows = {item_id: row for row, item_id in enumerate(index.ids)}
        self.data = data
        self.input_config = input_config
        self.splits: dict = {}

    def split_image(self, split: str, i: int) -> Image.Image:
        if split not in self.splits:
            datamodule = data_module(self.data, self.input_config, split)
            datamodule.setup("predict")
            self.splits[split] = datamodule.splits[split]
        return to_pil_image(self.splits[split][i][0]).convert("RGB")

    def image(self, row: int) -> Image.Image | None:
        """The item at `row` as stored (RGB), or None for a row outside the index or an unreadable file."""
        if not 0 <= row < len(self.items):
            return None
        item = self.items[row]
        match = SPLIT_ITEM.match(item)
        try:
            return self.split_image(match["split"], int(match["index"])) if match else open_rgb(item)
        except (*DECODE_ERRORS, KeyError, IndexError) as err:
            log.warning("no picture for catalogue item %s (%s)", item, err)
            return None

    def thumbnail(self, item_id: int) -> Image.Image | None:
        img = self.image(self.rows.get(item_id, -1))
        if img is None:
            return None
        if max(img.size) > THUMBNAIL:
            img.thumbnail((THUMBNAIL, THUMBNAIL))
        elif max(img.size) < 64:  # 28 px items would be specks in the gallery
            img = img.resize((THUMBNAIL, THUMBNAIL), Image.NEAREST)
        return img
