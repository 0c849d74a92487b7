"""Decoding the images real product folders hold, and finding the ones that cannot be decoded.

Catalogue photos come as CMYK JPEGs, palette or 16-bit PNGs, and cut-outs with transparent backgrounds.
Every one becomes 8-bit RGB: 16-bit values are scaled (not clipped), transparency is laid on white (the
usual catalogue background). A truncated or non-image file is found once, at setup, and skipped.
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


def open_rgb(path: str | Path) -> Image.Image:
    """Decode the whole file (so truncation shows now, not mid-epoch) into 8-bit RGB."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def decode_error(path: Path) -> str | None:
    """None if the file decodes fully, else a short reason."""
    try:
        open_rgb(path)
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
