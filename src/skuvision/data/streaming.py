"""Catalogues beyond one machine: litdata shards, written once by shard.py, streamed from a folder or s3://.

`python shard.py` (skuvision.tasks.shard) reads a file source (image_folder, manifest) through its splits,
resizes every image once to the model's eval geometry before the crop (image_size / crop_pct, the square
its crop_mode makes: the center square, the whole image squashed, or padded) and writes per split litdata
chunks of encoded images and labels, plus `skuvision_shards.json`: class names, geometry and counts, so
classes are known without reading a shard.

`data=streaming` trains from them. The training loader is litdata's StreamingDataLoader, which Lightning saves
into and restores from the Trainer's checkpoint (a run resumes mid-epoch where it stopped). Under DDP litdata
splits every epoch among ranks and workers; `drop_last` gives every rank the same number of full batches
(uneven batch counts hang DDP), so up to ranks x batch - 1 images of an epoch are left out, different ones
each epoch as the order is reshuffled. Every split yields uint8 CHW images like the other sources. Inference
on several processes reads a split through data/stream_positions.py instead (drop_last=False, each image
once).
"""

from __future__ import annotations

import io
import json
import logging
from functools import cached_property
from pathlib import Path

import torch
from torchvision.transforms.v2.functional import to_pil_image

from skuvision.compat import use_boto3_for_plain_http
from skuvision.data.datamodule import SPLITS, ImageDataModule
from skuvision.data.decode import DECODE_ERRORS, open_rgb
from skuvision.data.transforms import border_fill, crop_mode, scale_size
from skuvision.errors import SkuvisionError
from skuvision.outputs import write_new_text

log = logging.getLogger(__name__)

METADATA_FILE = "skuvision_shards.json"
SHARD_FORMAT = 1
ENCODINGS = ("jpeg", "png")


def is_remote(root: str) -> bool:
    return "://" in str(root)


def join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}" if is_remote(root) else str(Path(root) / name)


use_boto3_for_plain_http()


def s3_object(url: str) -> tuple:
    """(boto3 S3 client, bucket, key); boto3 reads AWS_ENDPOINT_URL and the keys from the environment."""
    import boto3

    bucket, _, key = url.split("://", 1)[1].partition("/")
    return boto3.client("s3"), bucket, key


def read_metadata(root: str) -> dict | None:
    """The shard folder's metadata, or None where there is none."""
    url = join(root, METADATA_FILE)
    if not is_remote(root):
        path = Path(url).expanduser()
        return json.loads(path.read_text()) if path.is_file() else None
    if not url.startswith("s3://"):
        raise SkuvisionError(f"data.root={root}: streams come from a folder or an s3:// URL")
    client, bucket, key = s3_object(url)
    try:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
    except client.exceptions.NoSuchBucket as err:
        raise SkuvisionError(f"data.root={root}: no such bucket {bucket}") from err
    return json.loads(body)


def write_metadata(root: str, metadata: dict) -> None:
    text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
    url = join(root, METADATA_FILE)
    if is_remote(root):
        client, bucket, key = s3_object(url)
        client.put_object(Bucket=bucket, Key=key, Body=text.encode())
        return
    write_new_text(Path(url).expanduser(), text)


def encode_image(image: torch.Tensor, encoding: str, quality: int) -> bytes:
    """uint8 CHW -> JPEG (lossy, small) or PNG (lossless) bytes."""
    pil = to_pil_image(image)
    out = io.BytesIO()
    if encoding == "jpeg":
        pil.save(out, format="JPEG", quality=quality)
    else:
        pil.save(out, format="PNG")
    return out.getvalue()


class EncodeSample:
    """litdata.optimize's function: index of a file source's split -> {"image": bytes, "label", "index",
    "path" (the source file's path, UTF-8 bytes)}. Bytes, because litdata stores a str that names an
    existing image file as that image (its `str` serializer declines existing files; 0.2.76): each item
    would carry its full-size original, and a folder of PNGs and JPEGs fails with inconsistent chunks."""

    def __init__(self, dataset, encoding: str, quality: int):
        self.dataset = dataset
        self.encoding = encoding
        self.quality = quality

    def __call__(self, index: int) -> dict:
        image, label = self.dataset[index]
        path, _ = self.dataset.samples[index]
        encoded = encode_image(image, self.encoding, self.quality)
        return {"image": encoded, "label": int(label), "index": index, "path": str(path).encode()}


def stored_crop(model_input: dict) -> str:
    """What a stored square already holds of the eval geometry: center cropped, squashed, or border padded
    (with that model's mean)."""
    mode = crop_mode(model_input)
    return f"{mode} (padded with {border_fill(model_input)})" if mode == "border" else mode


class DecodeSample:
    """litdata's per-item transform: a stored item -> (uint8 CHW at the model's size, label), through the same
    per-image transform as the file sources (eval, or the training augmentation), within the model's pixel
    budget like every file read."""

    def __init__(self, image_transform, channels: int, max_pixels: int | None = None):
        self.image_transform = image_transform
        self.channels = channels
        self.max_pixels = max_pixels

    def __call__(self, item: dict) -> tuple[torch.Tensor, int]:
        try:
            image = open_rgb(io.BytesIO(item["image"]), max_pixels=self.max_pixels)
        except DECODE_ERRORS as err:
            raise SkuvisionError(
                f"a stored image (index {item.get('index')}) does not decode: {err}"
            ) from err
        out = self.image_transform(image)
        return (out[: self.channels] if self.channels == 1 else out), int(item["label"])


class StreamingDataModule(ImageDataModule):
    """Shards written by shard.py, from a folder or an s3:// URL (`root`)."""

    def __init__(
        self,
        root: str,
        input_config: dict,
        cache_dir: str | None = None,
        max_cache_size: str | None = None,
        **kwargs,
    ):
        """`cache_dir`: where chunks of a remote root are kept (litdata's default when None);
        `max_cache_size`: e.g. "50GB" (litdata's default when None)."""
        super().__init__(root=root, input_config=input_config, **kwargs)
        if self.subset is not None:
            raise SkuvisionError(
                "data.subset does not apply to data=streaming: write shards of a subset instead "
                "(python shard.py data.subset=...)"
            )
        if self.balance == "sampler":
            raise SkuvisionError(
                "data.balance=sampler needs random access to the training split: with data=streaming use "
                "data.balance=loss"
            )
        self.cache_dir = cache_dir
        self.max_cache_size = max_cache_size
        self.check_geometry()
        self.train_loader = None
        self.train_loader_state: dict | None = None  # from a checkpoint, for the next training loader

    @cached_property
    def metadata(self) -> dict:
        metadata = read_metadata(self.root)
        if metadata is None:
            raise SkuvisionError(
                f"data.root={self.root} holds no {METADATA_FILE}: write shards there first with "
                f"python shard.py data=... output={self.root}"
            )
        if metadata.get("format") != SHARD_FORMAT:
            raise SkuvisionError(
                f"{join(self.root, METADATA_FILE)} has shard format {metadata.get('format')}, this version "
                f"reads format {SHARD_FORMAT}: write the shards again with python shard.py"
            )
        return metadata

    @property
    def class_names(self) -> list[str]:
        return list(self.metadata["class_names"])

    @property
    def stored_size(self) -> int:
        return int(self.metadata["image_size"])

    def check_geometry(self) -> None:
        """Shards stored smaller than the model's resize would be upsampled, and shards cropped or padded for
        another crop_mode show the model other images: refuse both."""
        channels, size, _ = self.input_config["input_size"]
        if channels != self.metadata["in_chans"]:
            raise SkuvisionError(
                f"the shards in {self.root} hold {self.metadata['in_chans']}-channel images, the model takes "
                f"{channels}"
            )
        stored, wanted = stored_crop(self.metadata["model_input"]), stored_crop(self.input_config)
        if stored != wanted:
            mode = crop_mode(self.input_config)
            raise SkuvisionError(
                f"the shards in {self.root} hold images for input.crop_mode={stored}, this model takes "
                f"{wanted}: write shards for it (python shard.py model=... input.crop_mode={mode})"
            )
        needed = scale_size(size, self.input_config["crop_pct"])
        if needed > self.stored_size:
            raise SkuvisionError(
                f"the shards in {self.root} hold {self.stored_size} px images; input.image_size={size} "
                f"resizes to {needed} px: write shards for it (python shard.py input.image_size={size})"
            )

    def class_counts(self) -> dict[str, list[int]]:
        counts = self.metadata["counts"]
        return {split: [counts[split].get(name, 0) for name in self.class_names] for split in SPLITS}

    @property
    def training_path(self) -> str:
        return f"litdata stream of {self.root}"

    def setup(self, stage: str | None = None) -> None:
        """`splits`: each split in stored order, for tasks that read a split directly (embed, evaluate's
        plots). The loaders make datasets of their own: litdata divides the data by the process group it
        finds when a dataset is made, and the test after a DDP fit runs on one process."""
        if hasattr(self.augment, "set_num_classes"):
            self.augment.set_num_classes(self.num_classes)
        for split in SPLITS:
            if split not in self.splits and sum(self.metadata["counts"][split].values()):
                self.stream(split, shuffle=False)

    def stream(self, split: str, shuffle: bool):
        from litdata import StreamingDataset

        if not sum(self.metadata["counts"][split].values()):
            raise SkuvisionError(f"the shards in {self.root} hold no {split} images")
        training = split == "train"
        per_image = self.train_transform if training else None
        dataset = StreamingDataset(
            join(self.root, split),
            cache_dir=self.cache_dir,  # litdata keeps each remote folder apart in it
            shuffle=shuffle,
            drop_last=training,  # equal full batches on every rank: uneven ones hang DDP
            seed=self.seed,
            max_cache_size=self.max_cache_size,
            transform=DecodeSample(per_image or self.eval_transform, self.in_chans, self.pixel_budget),
        )
        self.splits[split] = dataset
        return dataset

    def _loader(self, split: str, shuffle: bool):
        from litdata import StreamingDataLoader

        training = split == "train"
        if training:
            batch_size = self.per_process_batch_size()
            images = sum(self.metadata["counts"]["train"].values())
            if images < self.batch_size:  # every rank steps through whole batches only
                raise SkuvisionError(
                    f"the shards in {self.root} hold {images} training images, fewer than one batch "
                    f"(data.batch_size={self.batch_size}, the global batch): use a smaller data.batch_size"
                )
        else:
            # litdata deals whole batches to ranks: a split smaller than ranks x batch would leave a rank with
            # none, which Lightning refuses. Only speed depends on the evaluation batch, so it shrinks to fit.
            images = sum(self.metadata["counts"][split].values())
            batch_size = min(self.per_process_eval_batch_size(), max(1, images // self.num_processes))
        loader = StreamingDataLoader(
            self.stream(split, shuffle),
            batch_size=batch_size,
            num_workers=self.num_workers,
            # Persistent workers would keep the first epoch's dataset copies: every epoch in the same order.
            persistent_workers=False,
            pin_memory=torch.cuda.is_available(),
        )
        if training:
            if self.train_loader_state:
                loader.load_state_dict(self.train_loader_state)
                self.train_loader_state = None
            self.train_loader = loader
        return loader

    # The training loader's position goes into checkpoints through the data module's own state. Lightning's
    # fit loop saves it too, but restores it only into a loader made after the restore; a schedule that counts
    # the run's steps (OneCycle, the default) makes the loader before, and the position would be lost
    # (pytorch-lightning 2.6.6; tests/test_streaming.py resumes mid-epoch under OneCycle).
    def state_dict(self) -> dict:
        return {"train_loader": self.train_loader.state_dict()} if self.train_loader is not None else {}

    def load_state_dict(self, state_dict: dict) -> None:
        self.train_loader_state = state_dict.get("train_loader")
