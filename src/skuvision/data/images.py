"""Decoding the images real product folders hold, and finding the ones that cannot be decoded.

Catalogue photos come as CMYK JPEGs, palette or 16-bit PNGs, and cut-outs with transparent backgrounds.
Every one becomes 8-bit RGB: 16-bit values are scaled (not clipped), transparency is laid on white (the
usual catalogue background). A truncated or non-image file is found once, at setup, and skipped.

A JPEG much larger than the model's input is decoded at a reduced DCT scale (libjpeg's 1/2, 1/4, 1/8 through
Pillow's `draft`): a fraction of the cost of a full decode, and nothing is lost once the image is resized
down to the model's size anyway.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from timm.data.transforms import str_to_pil_interp

from skuvision.config import cache_dir

log = logging.getLogger(__name__)

SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB."""
    if img.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.float32)
        img = Image.fromarray(np.clip(wide / 257.0, 0, 255).round().astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


DCT_SCALES = (8, 4, 2)  # the reductions libjpeg decodes to directly


def resized_long_side(width: int, height: int, short_side: int) -> float:
    """The longer side after resizing the shorter one to `short_side`, keeping the aspect ratio."""
    return short_side * max(width, height) / min(width, height)


def dct_scale(width: int, height: int, min_side: int) -> int:
    """The largest JPEG reduction whose decoded image keeps a shorter side of at least `min_side` and, once
    that side is resized to `min_side`, the full image's geometry within a pixel (libjpeg rounds the reduced
    size up, which can stretch a thin image by a fraction of a pixel per side)."""
    full = resized_long_side(width, height, min_side)
    for scale in DCT_SCALES:
        w, h = -(-width // scale), -(-height // scale)
        if min(w, h) >= min_side and abs(resized_long_side(w, h, min_side) - full) <= 1:
            return scale
    return 1


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing the shorter side to `short_side`, rounded as torchvision's Resize."""
    long = int(resized_long_side(width, height, short_side))
    return (short_side, long) if width <= height else (long, short_side)


def open_rgb(path: str | Path, min_side: int | None = None, interpolation: str | None = None) -> Image.Image:
    """Decode the whole file (so truncation shows now, not mid-epoch) into 8-bit RGB.

    `min_side`: the shorter side the caller's transform needs; a JPEG is then decoded at the largest DCT
    reduction that keeps it (see `dct_scale`). Other formats, and None, decode at full size.
    `interpolation` (timm's name): a reduced JPEG is then resized at once to the size the full image's
    shorter side would be resized to, from exactly the region the reduced decode covers (libjpeg rounds the
    reduced size up, so its last row or column can be a partial pixel); the eval transform's own resize then
    has nothing left to do, and the result matches a full decode within resampling noise."""
    with Image.open(path) as img:
        width, height = img.size
        scale = dct_scale(width, height, min_side) if min_side and img.format == "JPEG" else 1
        if scale == 1:
            img.load()
            return to_rgb(img)
        _, box = img.draft(img.mode, (width // scale, height // scale))
        if img.size != (-(-width // scale), -(-height // scale)):  # the decoder chose another scale
            return open_rgb(path)
        img.load()
        rgb = to_rgb(img)
    if interpolation is None:
        return rgb
    return rgb.resize(resized_size(width, height, min_side), str_to_pil_interp(interpolation), box=box)


def check_decodes(path: str | Path) -> None:
    """Decode the whole file at the smallest scale the format allows: every byte of a JPEG is still
    entropy-decoded (a truncated file still fails), but at 1/8 the pixels."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(img.mode, (1, 1))
        img.load()
        to_rgb(img)


def decode_error(path: Path) -> str | None:
    """None if the file decodes fully, else a short reason."""
    try:
        check_decodes(path)
    except DECODE_ERRORS as err:
        return f"{type(err).__name__}: {err}"[:200] or type(err).__name__
    return None


def scan_images(root: Path, paths: list[Path], workers: int = 4) -> dict[Path, str]:
    """{path: reason} for the files that do not decode. Results are cached by file size and mtime, so a
    folder is decoded once, and again only where files changed."""
    if not paths:
        return {}
    root_key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    cache_file = cache_dir() / "image_scan" / f"{root_key}.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    stamps = {}
    for p in paths:
        st = p.stat()
        stamps[p] = f"{st.st_size}:{st.st_mtime_ns}"
    todo = [p for p in paths if cache.get(str(p), {}).get("stamp") != stamps[p]]
    if todo:
        log.info("checking %d image file(s) for decode errors (cached for next time)", len(todo))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes without the GIL
            for p, reason in zip(todo, pool.map(decode_error, todo), strict=True):
                cache[str(p)] = {"stamp": stamps[p], "error": reason}
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    return {p: cache[str(p)]["error"] for p in paths if cache[str(p)]["error"]}
