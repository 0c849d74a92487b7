"""The decoded-image cache (`data.cache=true`): each file decoded once into exactly the uint8 image the eval
transform makes of it, kept in memory-mapped shards that later epochs and later runs read instead.

Layout: `<cache_dir>/decoded/<geometry key>/<shard>.u8` (raw uint8, rows of C x H x W) and
`<shard>.json` (the file key of each row). The geometry key hashes the input size, crop_pct, crop_mode
(with border's padding value), interpolation, channels, the decoding policy (reduced-scale JPEGs, EXIF
orientation) and the Pillow version: another model geometry gets its own folder. A file's key is its
absolute path, size and mtime_ns, so a changed file misses and is decoded again: nothing stale is served,
and nothing is ever overwritten (a shard is written under a temporary name, then renamed; its .json is
published last, so readers only see complete shards).

Filling happens once per split in the main process at setup, with a thread pool (Pillow decodes and resizes
without holding the GIL). DataLoader workers only read: each opens the shards itself, read-only, on first
use. Fills of one folder take turns under a file lock, so the processes of a DDP run (or two runs started
together) decode each image once: the first fills, the others then find everything cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL
import torch
import torchvision
from filelock import FileLock

from skuvision.config import cache_dir
from skuvision.data.decode import DECODE_ERRORS
from skuvision.data.transforms import border_fill, crop_mode

log = logging.getLogger(__name__)

CACHE_FORMAT = 2  # bump when what a row holds changes (2: images turned by their EXIF orientation)


def geometry_key(input_config: dict, channels: int) -> str:
    """The folder name for one eval geometry."""
    geometry = {
        "format": CACHE_FORMAT,
        "input_size": [int(v) for v in input_config["input_size"]][-2:],
        "crop_pct": float(input_config["crop_pct"]),
        "interpolation": str(input_config["interpolation"]),
        "channels": int(channels),
        "decode": "pillow-dct-draft-exif",  # reduced-scale JPEG decoding changes pixels slightly
        "pillow": PIL.__version__,
        "torchvision": torchvision.__version__,  # its Resize and CenterCrop run in timm's eval transform
    }
    mode = crop_mode(input_config)
    if mode != "center":  # center keeps the key it had before crop_mode existed: those caches stay valid
        geometry["crop_mode"] = mode
    if mode == "border":
        geometry["fill"] = border_fill(input_config)  # the padding's pixels
    return hashlib.sha1(json.dumps(geometry, sort_keys=True).encode()).hexdigest()[:16]


def file_key(path: Path) -> str | None:
    """absolute path, size and mtime_ns; None for a file that cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"


class CachedImages:
    """Where each image of one dataset lies in the shards; `get(i)` reads it (None: not cached).

    Pickles without its open memory maps, so each DataLoader worker maps the shards itself."""

    def __init__(self, shards: list[tuple[str, int]], shape: tuple[int, ...], locations: np.ndarray):
        self.shards = shards  # (file, rows)
        self.shape = tuple(shape)
        self.locations = locations  # (N, 2) int64: shard index, row; -1 where not cached
        self._maps: dict[int, np.memmap] = {}

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _shard(self, index: int) -> np.memmap:
        if index not in self._maps:
            file, rows = self.shards[index]
            self._maps[index] = np.memmap(file, dtype=np.uint8, mode="r", shape=(rows, *self.shape))
        return self._maps[index]

    def get(self, index: int) -> torch.Tensor | None:
        shard, row = self.locations[index]
        if shard < 0:
            return None
        return torch.from_numpy(np.array(self._shard(int(shard))[int(row)]))

    @property
    def count(self) -> int:
        return int((self.locations[:, 0] >= 0).sum())


class DecodedImageCache:
    """One geometry's folder of shards."""

    def __init__(self, input_config: dict, channels: int = 3, root: Path | None = None):
        self.shape = (int(channels), *[int(v) for v in input_config["input_size"]][-2:])
        self.folder = Path(root or cache_dir() / "decoded") / geometry_key(input_config, channels)

    def index(self) -> tuple[list[tuple[str, int]], dict[str, tuple[int, int]]]:
        """The published shards and {file key: (shard index, row)}."""
        shards: list[tuple[str, int]] = []
        where: dict[str, tuple[int, int]] = {}
        for meta in sorted(self.folder.glob("*.json")):
            try:
                keys = json.loads(meta.read_text())["keys"]
            except (OSError, ValueError, KeyError):
                log.warning("ignoring unreadable cache index %s", meta)
                continue
            data = meta.with_suffix(".u8")
            if not data.is_file() or data.stat().st_size != len(keys) * int(np.prod(self.shape)):
                log.warning("ignoring cache shard %s: its data file is missing or of the wrong size", data)
                continue
            shard = len(shards)
            shards.append((str(data), len(keys)))
            for row, key in enumerate(keys):
                where[key] = (shard, row)
        return shards, where

    def fill(
        self, dataset, indices: list[int] | None = None, workers: int = 4, split: str = ""
    ) -> CachedImages:
        """Locate `dataset`'s images (ImageFiles: `paths` and `decode(i)`) in the cache, decoding and
        storing those that are missing or changed; `indices` limits this to a subset. Files that fail to
        decode are left uncached (the dataset then decodes them, and reports them, as without a cache)."""
        indices = list(range(len(dataset))) if indices is None else list(indices)
        self.folder.mkdir(parents=True, exist_ok=True)
        with FileLock(self.folder / ".lock"):
            cached, decoded = self._fill(dataset, indices, workers)
        log.info(
            "decoded-image cache%s: %d image(s) read from cache, %d decoded and stored, %d not cached (%s)",
            f" ({split})" if split else "",
            cached.count - decoded,
            decoded,
            len(indices) - cached.count,
            self.folder,
        )
        return cached

    def _fill(self, dataset, indices: list[int], workers: int) -> tuple[CachedImages, int]:
        shards, where = self.index()
        locations = np.full((len(dataset), 2), -1, dtype=np.int64)
        todo: list[tuple[int, str]] = []
        for i in indices:
            key = file_key(dataset.paths[i])
            if key is None:
                continue
            if key in where:
                locations[i] = where[key]
            else:
                todo.append((i, key))
        if todo:
            new = self._write_shard(dataset, todo, workers)
            if new is not None:
                file, keys = new
                shards.append((file, len(keys)))
                rows = {key: row for row, key in enumerate(keys)}
                for i, key in todo:
                    if key in rows:
                        locations[i] = (len(shards) - 1, rows[key])
        decoded = int((locations[[i for i, _ in todo], 0] >= 0).sum()) if todo else 0
        return CachedImages(shards, self.shape, locations), decoded

    def _write_shard(self, dataset, todo: list[tuple[int, str]], workers: int):
        """Decode `todo` into a new shard; returns (data file, keys of its rows) or None if none decoded."""
        name = uuid.uuid4().hex
        tmp = self.folder / f".{name}.u8.tmp"
        data = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=(len(todo), *self.shape))
        keys: list[str] = []

        def decode(item: tuple[int, str]) -> torch.Tensor | None:
            i, key = item
            try:
                image = dataset.decode(i)
            except DECODE_ERRORS:
                return None
            # A file rewritten while it was decoded would be stored under its old key: keep it out.
            return image if file_key(dataset.paths[i]) == key else None

        try:
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for (_, key), image in zip(todo, pool.map(decode, todo), strict=True):
                    if image is None:
                        continue
                    if tuple(image.shape) != self.shape or image.dtype != torch.uint8:
                        # The transform and the shape come from one input config: a mismatch is a bug here,
                        # not a file that does not decode (ValueError is one of DECODE_ERRORS).
                        raise RuntimeError(
                            f"decoded-image cache: the transform gave {image.dtype} {tuple(image.shape)}, "
                            f"not uint8 {self.shape}"
                        )
                    data[len(keys)] = image.numpy()
                    keys.append(key)
            data.flush()
            del data
            if not keys:
                tmp.unlink()
                return None
            final = self.folder / f"{name}.u8"
            os.truncate(tmp, len(keys) * int(np.prod(self.shape)))  # rows of files that failed to decode
            tmp.replace(final)
            meta_tmp = self.folder / f".{name}.json.tmp"
            meta_tmp.write_text(json.dumps({"keys": keys, "shape": list(self.shape)}))
            meta_tmp.replace(self.folder / f"{name}.json")  # publishes the shard
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return str(final), keys
