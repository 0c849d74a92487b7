"""Small data sets written in the real on-disk formats, with class-dependent patterns a model can learn."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from skuvision.data.cifar import CIFAR100_CLASSES


def pattern_images(labels: np.ndarray, size: int, channels: int, seed: int) -> np.ndarray:
    """uint8 (N, H, W, C): a bright bar whose position encodes the class, on noise."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    images = rng.integers(0, 60, size=(n, size, size, channels), dtype=np.uint8)
    num_classes = int(labels.max()) + 1
    band = max(1, size // max(num_classes, 1))
    for i, label in enumerate(labels):
        start = (int(label) * band) % size
        images[i, start : start + band, :, :] = 230
    return images


def balanced_labels(n: int, num_classes: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, n_train: int = 400, n_test: int = 100) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        labels = balanced_labels(n, 10, seed)
        images = pattern_images(labels, 28, 1, seed)[..., 0]
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def _pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def _cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    labels = balanced_labels(n, num_classes, seed)
    images = pattern_images(labels, 32, 3, seed).transpose(0, 3, 1, 2).reshape(n, 3072)  # CHW rows
    return {b"data": images, label_key: labels.tolist(), b"batch_label": b"synthetic"}


def write_cifar10(root: Path, per_batch: int = 60, n_test: int = 60) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        _pickle(folder / f"data_batch_{i}", _cifar_batch(per_batch, 10, b"labels", i))
    _pickle(folder / "test_batch", _cifar_batch(n_test, 10, b"labels", 9))
    names = [
        b"airplane",
        b"automobile",
        b"bird",
        b"cat",
        b"deer",
        b"dog",
        b"frog",
        b"horse",
        b"ship",
        b"truck",
    ]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    return root


def write_cifar100(root: Path, n_train: int = 400, n_test: int = 200) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    _pickle(folder / "train", _cifar_batch(n_train, 100, b"fine_labels", 0))
    _pickle(folder / "test", _cifar_batch(n_test, 100, b"fine_labels", 1))
    _pickle(folder / "meta", {b"fine_label_names": [n.encode() for n in CIFAR100_CLASSES]})
    return root


def write_image_folder(
    root: Path,
    classes=("phone", "shirt", "toaster"),
    per_class: int = 12,
    size: int = 40,
    presplit: bool = False,
) -> Path:
    """PNG and JPEG files (alternating) under root/<class>/ or root/<split>/<class>/."""
    splits = {"train": per_class, "val": max(2, per_class // 3), "test": max(2, per_class // 3)}
    targets = {s: root / s for s in splits} if presplit else {"all": root}
    counts = splits if presplit else {"all": per_class}
    labels_all = np.arange(len(classes))
    for split, base in targets.items():
        for label, name in zip(labels_all, classes, strict=True):
            (base / name).mkdir(parents=True, exist_ok=True)
            n = counts[split]
            # zlib.crc32, not hash(): str hashes change with each process, and so would the images.
            seed = zlib.crc32(f"{split}/{name}".encode()) % 1000
            images = pattern_images(np.full(n, label), size, 3, seed=seed)
            for i, img in enumerate(images):
                suffix = ".png" if i % 2 == 0 else ".jpg"
                Image.fromarray(img).save(base / name / f"{name}_{i:03d}{suffix}")
    return root


def write_manifest(path: Path, folder: Path, **columns) -> Path:
    """A CSV (or Parquet, by suffix) of every image under folder/<class>/: `path` relative to the manifest's
    folder, `label` the class folder, and any extra columns given as lists."""
    import pandas as pd

    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    table = pd.DataFrame(
        {
            "path": [os.path.relpath(p, path.parent) for p in files],
            "label": [p.parent.name for p in files],
            **columns,
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        table.to_parquet(path)
    else:
        table.to_csv(path, index=False)
    return path


def write_product_images(folder: Path, classes: dict[str, int], first_id: int = 1000, size: int = 32) -> list:
    """JPEGs named by product id, folder/<id>.jpg, as a catalogue's image dump holds them: `classes` gives the
    count per class; returns (id, class) in id order."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [name for name, count in classes.items() for _ in range(count)]
    products = [(str(first_id + k), name) for k, name in enumerate(names)]
    labels = np.array([list(classes).index(name) for name in names])
    for (id_, _), img in zip(products, pattern_images(labels, size, 3, seed=first_id), strict=True):
        Image.fromarray(img).save(folder / f"{id_}.jpg", quality=90)
    return products


def write_photo_folder(root: Path, classes=("kettle", "shirt"), per_class: int = 6, seed: int = 0) -> Path:
    """Real photo content (scikit-image's sample photos), cropped and resized to a different size and aspect
    per file, saved as JPEG (quality 90) under root/<class>/; one PNG per class for the non-JPEG path."""
    from skimage import data as photos

    sources = [photos.astronaut(), photos.chelsea(), photos.coffee()]
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            src = sources[(c + i) % len(sources)]
            h, w = src.shape[:2]
            top, left = rng.integers(0, h // 4), rng.integers(0, w // 4)
            crop = Image.fromarray(src[top : top + 3 * h // 4, left : left + 3 * w // 4])
            size = (int(rng.integers(150, 260)), int(rng.integers(150, 260)))
            img = crop.resize(size, Image.BICUBIC)
            if i == 0:
                img.save(root / name / f"{name}_{i:03d}.png")
            else:
                img.save(root / name / f"{name}_{i:03d}.jpg", quality=90)
    return root


def write_huge_png(path: Path, width: int = 13000, height: int = 13000) -> Path:
    """An all-black 8-bit RGB PNG of width x height px, compressed row by row (the image is never in memory):
    13000 x 13000 px (169 Mpx, under Pillow's decompression-bomb limit of 179 Mpx) in 0.5 MB."""
    compress = zlib.compressobj(9)
    row = b"\0" * (1 + 3 * width)  # filter type 0, then the pixels
    idat = b"".join([compress.compress(row) for _ in range(height)] + [compress.flush()])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


# How to store an upright image so that an EXIF orientation turns it back (the inverse of each transpose
# ImageOps.exif_transpose applies); tests check the files against exif_transpose itself.
STORED_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


def write_oriented_jpeg(path: Path, upright: Image.Image, orientation: int = 6, quality: int = 95) -> Path:
    """A JPEG as a phone writes it: the pixels stored turned (Orientation=6: as the sensor saw a portrait
    shot, 90 degrees anticlockwise), with the EXIF Orientation tag that says how to show them."""
    exif = Image.Exif()
    exif[0x0112] = orientation  # ExifTags.Base.Orientation
    upright.transpose(STORED_FOR_ORIENTATION[orientation]).save(path, quality=quality, exif=exif)
    return path


CATALOGUE_TYPES = {"Tshirts": "Apparel", "Shirts": "Apparel", "Sandals": "Footwear", "Heels": "Footwear"}
CATALOGUE_COLOURS = {"Red": (200, 40, 40), "Green": (40, 170, 60), "Blue": (40, 60, 200)}
CATALOGUE_HEADER = (
    "id,gender,masterCategory,subCategory,articleType,baseColour,season,year,usage,productDisplayName,tags"
)


def catalogue_photo(article: int, colour: tuple, tags: set[str], rng: np.random.Generator) -> Image.Image:
    """A 48x64 portrait product photo: the article type is where a bright bar stands, the colour tints the
    whole picture, a "sticker" is a yellow patch in the top rows and "floral" a checker in the bottom rows
    (both where a centre crop of a portrait photo would cut)."""
    h, w = 64, 48
    img = np.clip(rng.normal(0.35, 0.08, (h, w, 1)) * np.array(colour)[None, None] * 1.6, 0, 255)
    left = 6 + article * 9
    img[14:50, left : left + 7] = 245
    if "sticker" in tags:
        img[1:9, 8:40] = (250, 230, 20)
    if "floral" in tags:
        yy, xx = np.mgrid[56:63, 4:44]
        img[56:63, 4:44] = np.where(((yy // 2 + xx // 2) % 2)[..., None] == 0, 255, 0)
    return Image.fromarray(img.astype(np.uint8))


def write_catalogue_export(root: Path, n: int = 240, seed: int = 0) -> tuple[Path, list[str]]:
    """A catalogue export laid out like the public product-image set: styles.csv (id, gender,
    masterCategory, subCategory, articleType, baseColour, ..., productDisplayName, tags) with images at
    images/<id>.jpg, portrait. Returns the CSV and its lines (header first) so callers can plant defects."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    types, colours = list(CATALOGUE_TYPES), list(CATALOGUE_COLOURS)
    lines = [CATALOGUE_HEADER]
    for i in range(n):
        article, colour = i % len(types), int(rng.integers(len(colours)))
        tags = {t for t in ("sticker", "floral") if rng.random() < 0.35}
        pid = 10000 + i
        catalogue_photo(article, CATALOGUE_COLOURS[colours[colour]], tags, rng).save(
            root / "images" / f"{pid}.jpg", quality=95
        )
        name, master = types[article], CATALOGUE_TYPES[types[article]]
        sub = "Topwear" if master == "Apparel" else "Shoes"
        display = f"{colours[colour]} {name} {i}"
        lines.append(
            f"{pid},Unisex,{master},{sub},{name},{colours[colour]},Summer,2012,Casual,{display},"
            + ";".join(sorted(tags))
        )
    csv_path = root / "styles.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path, lines


RED = (255, 0, 0)


def banded_portrait(width: int = 60, height: int = 80, band: int = 6, seed: int = 0) -> Image.Image:
    """A 3:4 product photo stand-in: noise with no red in it (every channel <= 150), a red band of `band` rows
    at the top and at the bottom: what a center crop cuts off."""
    pixels = np.random.default_rng(seed).integers(0, 151, size=(height, width, 3), dtype=np.uint8)
    pixels[:band] = pixels[-band:] = RED
    return Image.fromarray(pixels)


def red_pixels(image) -> np.ndarray:
    """(H, W) bool: the red pixels of a uint8 CHW tensor (RGB)."""
    r, g, b = np.asarray(image).astype(int)
    return (r > 200) & (g < 60) & (b < 60)


def write_catalogue_table(
    root: Path, n: int = 240, seed: int = 0, square: bool = False
) -> tuple[Path, pd.DataFrame]:
    """write_catalogue_export's data as a manifest: its styles.csv with a path column (images/<id>.jpg) in
    root/manifest.csv; returns the file and its table (every cell text), for callers to plant defects.
    `square`: each photo padded with white to 64x64, as catalogues often store them, so that a centre crop
    keeps the sticker and floral marks (the tags) at the top and bottom."""
    csv_path, _ = write_catalogue_export(root, n=n, seed=seed)
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    table.insert(0, "path", [f"images/{pid}.jpg" for pid in table["id"]])
    if square:
        for path in table["path"]:
            photo = Image.open(root / path)
            canvas = Image.new("RGB", (max(photo.size),) * 2, (255, 255, 255))
            canvas.paste(photo, ((canvas.width - photo.width) // 2, (canvas.height - photo.height) // 2))
            canvas.save(root / path, quality=95)
    table.to_csv(root / "manifest.csv", index=False)
    return root / "manifest.csv", table
