"""Decoding the images real product folders hold, and finding the ones that cannot be decoded.

Catalogue photos come as CMYK JPEGs, palette or 16-bit PNGs, and cut-outs with transparent backgrounds.
Every one becomes 8-bit RGB: 16-bit values are scaled (not clipped), transparency is laid on white (the
usual catalogue background). A truncated or non-image file is found once, at setup, and skipped.

A JPEG much larger than the model's input is decoded at a reduced DCT scale (libjpeg's 1/2, 1/4, 1/8 through
Pillow's `draft`): a fraction of the cost of a full decode, and nothing is lost once the image is resized
down to the model's size anyway.

A pixel budget per model bounds what one file may cost: the pixels that would actually be decoded (after the
JPEG reduction) are read from the header and a file over the budget is refused before anything is decoded
(see `pixel_budget`). Pillow's MAX_IMAGE_PIXELS stays the global ceiling above it.

EXIF orientation (phone photos store their sensor's pixels and a tag saying how to turn them) is applied by
`ImageOps.exif_transpose`, so every decode path sees the image as a person does.

With `decode_on=gpu`, DataLoader workers hand over JPEG bytes instead (`JpegFile`, packed per batch into a
`JpegBatch`) and `decode_batch_on_device` decodes them together on the training device (nvJPEG on CUDA),
turning each upright itself (`upright`): torchvision applies the EXIF tag on the CPU only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from timm.data.transforms import ResizeKeepRatio, str_to_pil_interp
from torch.utils.data import default_collate
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from skuvision.config import cache_dir

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
DECODE_ON = ("cpu", "gpu")  # where data.decode_on decodes JPEGs of the eval geometry
SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


class ImageOverBudget(ValueError):
    """A file that would decode to more pixels than the model's pixel budget: refused from its header."""


DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, SyntaxError, Image.DecompressionBombError)

# A model whose eval transform resizes the shorter side to S decodes at most (8 S)^2 pixels: an image up to 8
# times its needed side each way, which libjpeg's 1/8 scale brings back to about S. Never under 16 Mpx, so a
# 12 Mpx phone photo in any format (PNG, TIFF, WebP: decoded in full) works with a 28 px model too; a 16 Mpx
# decode costs about 0.15 s and 130 MB here, a 169 Mpx one 6 s and 2.2 GB.
BUDGET_SIDE_FACTOR = 8
MIN_PIXEL_BUDGET = 4096 * 4096


def pixel_budget(min_side: int) -> int:
    """The most pixels a file may decode to for a transform that needs a shorter side of `min_side`."""
    return max(MIN_PIXEL_BUDGET, (BUDGET_SIDE_FACTOR * int(min_side)) ** 2)


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


def eval_resize_size(width: int, height: int, side: int, crop_mode: str = "center") -> tuple[int, int]:
    """(width, height) timm's eval transform resizes a width x height image to, for its resize side `side`
    (image_size / crop_pct) and `crop_mode`."""
    if crop_mode == "squash":
        return side, side
    if crop_mode == "border":
        # timm's own rounding; it reads only the shape of what it is given (here one with no pixels).
        height, width = ResizeKeepRatio.get_params(torch.empty(0, height, width), (side, side), longest=1.0)
        return width, height
    return resized_size(width, height, side)


def decode_scale(width: int, height: int, image_format: str | None, min_side: int | None) -> int:
    """The reduction `open_rgb` decodes a file of this size and format at (1: in full)."""
    return dct_scale(width, height, min_side) if min_side and image_format == "JPEG" else 1


def check_pixel_budget(width: int, height: int, scale: int, max_pixels: int | None) -> None:
    """ImageOverBudget if a width x height image decoded at 1/scale has more than `max_pixels` pixels."""
    pixels = -(-width // scale) * -(-height // scale)
    if max_pixels is not None and pixels > max_pixels:
        at = f" at 1/{scale} scale" if scale > 1 else ""
        side = math.isqrt(max_pixels)
        raise ImageOverBudget(
            f"{width}x{height} px image decodes to {pixels:,} pixels{at}, over this model's pixel budget of "
            f"{max_pixels:,}: resize it (e.g. to {side}x{side} px or less)"
        )


def open_rgb(
    path: str | Path | IO[bytes],
    min_side: int | None = None,
    interpolation: str | None = None,
    max_pixels: int | None = None,
    crop_mode: str = "center",
) -> Image.Image:
    """Decode the whole file (so truncation shows now, not mid-epoch) into 8-bit RGB, turned the way its EXIF
    orientation says.

    `min_side`: the shorter side the caller's transform needs; a JPEG is then decoded at the largest DCT
    reduction that keeps it (see `dct_scale`). Other formats, and None, decode at full size.
    `interpolation` (timm's name): a reduced JPEG is then resized at once to the size the eval transform
    resizes the full image to (for its `crop_mode`, see `eval_resize_size`), from exactly the region the
    reduced decode covers (libjpeg rounds the reduced size up, so its last row or column can be a partial
    pixel); the eval transform's own resize then has nothing left to do, and the result matches a full
    decode within resampling noise.
    `max_pixels`: the pixel budget (see `pixel_budget`); a file that would decode to more is refused with
    ImageOverBudget from its header, before any decoding."""
    with Image.open(path) as img:
        width, height = img.size
        scale = decode_scale(width, height, img.format, min_side)
        check_pixel_budget(width, height, scale, max_pixels)
        if scale == 1:
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # reads the tag; transposes only when it says so
            return to_rgb(img)
        _, box = img.draft(img.mode, (width // scale, height // scale))
        if img.size != (-(-width // scale), -(-height // scale)):  # the decoder chose another scale
            return open_rgb(path, max_pixels=max_pixels)
        img.load()
        rgb = to_rgb(img)
    if interpolation is not None:
        # In the stored orientation, where the box and the sizes were computed.
        size = eval_resize_size(width, height, min_side, crop_mode)
        rgb = rgb.resize(size, str_to_pil_interp(interpolation), box=box)
    # A JPEG's EXIF and XMP travel in `info` through convert and resize: the small result is turned upright.
    ImageOps.exif_transpose(rgb, in_place=True)
    return rgb


def check_decodes(path: str | Path) -> None:
    """Decode the whole file at the smallest scale the format allows: every byte of a JPEG is still
    entropy-decoded (a truncated file still fails), but at 1/8 the pixels."""
    with Image.open(path) as img:
        if img.format == "JPEG":
            img.draft(img.mode, (1, 1))
        img.load()
        to_rgb(img)


def short_reason(err: Exception) -> str:
    return f"{type(err).__name__}: {err}"[:200] or type(err).__name__


def decode_error(path: Path) -> str | None:
    """None if the file decodes fully, else a short reason."""
    try:
        check_decodes(path)
    except DECODE_ERRORS as err:
        return short_reason(err)
    return None


def over_budget(facts: dict, min_side: int | None, max_pixels: int | None) -> str | None:
    """Why a file with these header facts (see `scan_facts`) is over the pixel budget; None if it is not."""
    if not facts.get("header"):
        return None
    image_format, width, height = facts["header"]
    try:
        check_pixel_budget(width, height, decode_scale(width, height, image_format, min_side), max_pixels)
    except ImageOverBudget as err:
        return short_reason(err)
    return None


def scan_facts(path: Path, facts: dict, min_side: int | None, max_pixels: int | None) -> dict:
    """What the scan knows of a file: "header" (format, width, height; None if even the header does not
    read) and "error" (the decode check's reason or None), left out while the file is over the budget: the
    header says so without decoding, and a later, larger budget still decodes it then."""
    facts = dict(facts)
    if "header" not in facts:
        try:
            with Image.open(path) as img:
                facts["header"] = [img.format, *img.size]
        except DECODE_ERRORS as err:
            return {**facts, "header": None, "error": short_reason(err)}
    if "error" not in facts and over_budget(facts, min_side, max_pixels) is None:
        facts["error"] = decode_error(path)
    return facts


def scan_images(
    root: Path,
    paths: list[Path],
    workers: int = 4,
    min_side: int | None = None,
    max_pixels: int | None = None,
) -> dict[Path, str]:
    """{path: reason} for the files that do not decode, or that would decode to more than `max_pixels` at a
    shorter side of `min_side` (the most any split decodes them at). Results are cached by file size and
    mtime, so a folder is decoded once, and again only where files changed; the budget is checked against
    the cached header every time, so another model's budget needs no decoding."""
    if not paths:
        return {}
    root_key = hashlib.sha1(str(Path(root).resolve()).encode()).hexdigest()[:16]
    cache_file = cache_dir() / "image_scan" / f"{root_key}.json"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    known = {}
    for p in paths:
        st = p.stat()
        stamp = f"{st.st_size}:{st.st_mtime_ns}"
        entry = cache.get(str(p), {})
        known[p] = entry if entry.get("stamp") == stamp and "header" in entry else {"stamp": stamp}

    def settled(facts: dict) -> bool:  # nothing left to decode under this budget
        if "header" not in facts:
            return False
        return "error" in facts or over_budget(facts, min_side, max_pixels) is not None

    todo = [p for p in paths if not settled(known[p])]
    if todo:
        log.info("checking %d image file(s) for decode errors (cached for next time)", len(todo))
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # PIL decodes without the GIL
            checked = pool.map(lambda p: scan_facts(p, known[p], min_side, max_pixels), todo)
            for p, facts in zip(todo, checked, strict=True):
                cache[str(p)] = known[p] = facts
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(cache))
        tmp.replace(cache_file)
    reasons = {p: known[p].get("error") or over_budget(known[p], min_side, max_pixels) for p in paths}
    return {p: reason for p, reason in reasons.items() if reason}


class JpegFile(NamedTuple):
    """A JPEG file's bytes (1-D uint8) and its EXIF orientation (1-8), for the device decoder."""

    data: torch.Tensor
    orientation: int


def device_orientation(data: torch.Tensor, max_pixels: int | None = None) -> int | None:
    """The EXIF orientation (1: as stored) of JPEG bytes the device decoder takes, or None for those it does
    not: CMYK and other formats, and JPEGs whose full size is over `max_pixels` (the device decodes in full;
    the CPU path decodes them at reduced scale, within the budget, or refuses them)."""
    if len(data) < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    with Image.open(io.BytesIO(data.numpy().tobytes())) as img:  # reads the header only
        if img.mode not in ("RGB", "L"):
            return None
        if max_pixels is not None and img.width * img.height > max_pixels:
            return None
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    return orientation if orientation in ORIENTATIONS else 1


def device_jpeg(path: str | Path, max_pixels: int | None = None) -> JpegFile | None:
    """The file's bytes and EXIF orientation for the device decoder, or None where it does not take the file
    (see `device_orientation`): the caller decodes it on the CPU then."""
    data = read_file(str(path))
    orientation = device_orientation(data, max_pixels)
    return None if orientation is None else JpegFile(data, orientation)


# EXIF orientation -> (swap height and width, then flip these dims) of a (C, H, W) tensor: the transposes
# ImageOps.exif_transpose makes (2 FLIP_LEFT_RIGHT, 3 ROTATE_180, 4 FLIP_TOP_BOTTOM, 5 TRANSPOSE,
# 6 ROTATE_270, 7 TRANSVERSE, 8 ROTATE_90). torchvision's decode_jpeg applies the tag on the CPU only, so the
# device path turns its images itself; tests check this table against both libraries.
ORIENTATIONS = {
    1: (False, ()),
    2: (False, (-1,)),
    3: (False, (-2, -1)),
    4: (False, (-2,)),
    5: (True, ()),
    6: (True, (-1,)),
    7: (True, (-2, -1)),
    8: (True, (-2,)),
}


def upright(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """A (C, H, W) image as stored in its JPEG -> as its EXIF orientation says it is seen, on its device."""
    swap, flips = ORIENTATIONS[orientation]
    if swap:
        image = image.transpose(-2, -1)
    return image.flip(flips) if flips else image


class JpegBatch(NamedTuple):
    """Images of a batch as they leave the DataLoader workers with `decode_on=gpu`: the JPEG files packed end
    to end in one uint8 tensor, so a batch crosses from a worker in one shared-memory handle rather than one
    per image (hundreds per batch exhaust the open-file limit); images the device decoder does not take
    arrive decoded, at the model's size."""

    data: torch.Tensor  # uint8: the JPEG files, end to end
    lengths: torch.Tensor  # int64: bytes of each JPEG
    orientations: torch.Tensor  # int64: EXIF orientation of each JPEG
    jpeg_positions: torch.Tensor  # int64: where each JPEG sits in the batch
    decoded: torch.Tensor  # uint8 NxCxHxW (N may be 0): the other images
    decoded_positions: torch.Tensor  # int64

    @property
    def num_images(self) -> int:
        return len(self.jpeg_positions) + len(self.decoded_positions)


def collate_images(batch: list[tuple]) -> tuple:
    """Like default_collate, but a batch holding JpegFiles becomes a JpegBatch."""
    images, *rest = zip(*batch, strict=True)
    rest = [default_collate(list(r)) for r in rest]
    jpegs = [i for i, img in enumerate(images) if isinstance(img, JpegFile)]
    if not jpegs:
        return (torch.stack(images), *rest)
    others = [i for i, img in enumerate(images) if not isinstance(img, JpegFile)]
    packed = JpegBatch(
        data=torch.cat([images[i].data for i in jpegs]),
        lengths=torch.tensor([len(images[i].data) for i in jpegs], dtype=torch.int64),
        orientations=torch.tensor([images[i].orientation for i in jpegs], dtype=torch.int64),
        jpeg_positions=torch.tensor(jpegs, dtype=torch.int64),
        decoded=torch.stack([images[i] for i in others]) if others else torch.empty(0, dtype=torch.uint8),
        decoded_positions=torch.tensor(others, dtype=torch.int64),
    )
    return (packed, *rest)


def decode_batch_on_device(images: JpegBatch, device: torch.device, resize_crop, channels: int = 3):
    """A JpegBatch -> a uint8 batch at the model's size on `device`. The JPEGs are decoded together (nvJPEG
    on CUDA), then each is resized and cropped (or padded) on the device by `resize_crop`
    (ToModelInput.resize_crop: the eval geometry of its crop_mode), after being turned upright by its EXIF
    orientation. A batch the device decoder refuses is decoded on the CPU instead."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    out: list[torch.Tensor | None] = [None] * images.num_images
    for position, img in zip(images.decoded_positions.tolist(), images.decoded, strict=True):
        out[position] = img.to(device, non_blocking=True)
    data = list(
        images.data.split(images.lengths.tolist())
    )  # views; decode_jpeg takes CPU bytes for any device
    if data:
        try:
            decoded = decode_jpeg(data, mode=mode, device=device)
        except RuntimeError as err:
            log.warning("device JPEG decoding failed for a batch (%s); decoding it on the CPU", err)
            decoded = [decode_jpeg(d, mode=mode).to(device) for d in data]
        positions, orientations = images.jpeg_positions.tolist(), images.orientations.tolist()
        for position, img, orientation in zip(positions, decoded, orientations, strict=True):
            out[position] = resize_crop(upright(img, orientation).unsqueeze(0))[0]
    return torch.stack(out)
