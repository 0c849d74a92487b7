"""shard(cfg): a file source (image_folder, manifest) -> litdata shards per split for data=streaming.

Every image is decoded and resized once, to the model's eval geometry before its crop (image_size / crop_pct,
the square its input.crop_mode makes: the center square, the whole image squashed, or fitted and padded):
training crops and evaluation take it from there.
"""

from __future__ import annotations

import logging
import multiprocessing
from pathlib import Path

from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from skuvision.compat import use_boto3_for_plain_http
from skuvision.config import plain, set_threads
from skuvision.data.datasets import LabelledImageFiles
from skuvision.data.streaming import (
    ENCODINGS,
    METADATA_FILE,
    SHARD_FORMAT,
    EncodeSample,
    is_remote,
    join,
    read_metadata,
    write_metadata,
)
from skuvision.data.transforms import scale_size
from skuvision.errors import SkuvisionError
from skuvision.models.input_config import resolve_input
from skuvision.outputs import refuse_existing, taken, write_new_json
from skuvision.tasks.utils import write_data_report

log = logging.getLogger("skuvision")


def shard_input(model_input: dict) -> dict:
    """The input config whose eval transform stores an image: resized, made square by the model's
    crop_mode, not cropped further."""
    stored = scale_size(model_input["input_size"][-1], model_input["crop_pct"])
    return {**model_input, "input_size": [model_input["input_size"][0], stored, stored], "crop_pct": 1.0}


def write_split(dataset, output: str, cfg: DictConfig) -> None:
    import litdata

    # litdata sets the process-wide start method (spawn by default, for every later DataLoader too); fork,
    # Linux's default, starts its workers without re-importing torch. Put back what was there after.
    previous = multiprocessing.get_start_method(allow_none=True)
    try:
        litdata.optimize(
            fn=EncodeSample(dataset, cfg.encoding, cfg.quality),
            inputs=list(range(len(dataset))),
            output_dir=output,
            chunk_bytes=cfg.chunk_bytes,
            num_workers=cfg.workers,
            start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
            verbose=False,
        )
    finally:
        multiprocessing.set_start_method(previous, force=True)


def shard(cfg: DictConfig) -> dict:
    set_threads(cfg.get("threads"))
    use_boto3_for_plain_http()
    if cfg.encoding not in ENCODINGS:
        raise SkuvisionError(f"encoding={cfg.encoding}: use one of {', '.join(ENCODINGS)}")
    output = str(cfg.output)
    if read_metadata(output) is not None:  # nothing written earlier is overwritten
        raise SkuvisionError(f"output={output} already holds shards ({METADATA_FILE}): choose a new output")
    if not is_remote(output) and taken(Path(output).expanduser()):  # an unfinished write, or other files
        raise SkuvisionError(f"output={output} is not empty: nothing was written; choose a new output")
    output_dir = Path(cfg.paths.output_dir)
    run_files = ("class_counts.json", "skipped_images.json", METADATA_FILE)
    refuse_existing([output_dir / name for name in run_files], "run it into a new run folder, or remove it")
    source = get_class(cfg.data._target_)
    model_input = resolve_input(plain(cfg.model), source.in_chans, **(plain(cfg.get("input")) or {}))
    stored_input = shard_input(model_input)
    # One pass over the files: no decoded-image cache, and decoded on the CPU (each image is encoded here).
    datamodule = instantiate(cfg.data, input_config=stored_input, augment=None, cache=False, decode_on="cpu")
    datamodule.setup()
    if not all(isinstance(ds, LabelledImageFiles) for ds in datamodule.splits.values()):
        raise SkuvisionError(
            f"data={cfg.data._target_} is not read from image files: shard.py takes data=image_folder or "
            "data=manifest"
        )
    counts = datamodule.class_counts()
    for split, dataset in datamodule.splits.items():
        if len(dataset):
            log.info("writing %d %s images to %s", len(dataset), split, join(output, split))
            write_split(dataset, join(output, split), cfg)
    metadata = {
        "format": SHARD_FORMAT,
        "class_names": datamodule.class_names,
        "in_chans": datamodule.in_chans,
        "image_size": stored_input["input_size"][-1],
        "model_input": model_input,
        "encoding": cfg.encoding,
        "quality": cfg.quality if cfg.encoding == "jpeg" else None,
        "counts": {split: dict(zip(datamodule.class_names, c, strict=True)) for split, c in counts.items()},
        "source": plain(cfg.data),
        "skipped": len(datamodule.skipped),
    }
    write_metadata(output, metadata)  # last: shards without it are an unfinished write
    write_data_report(datamodule, output_dir)
    write_new_json(output_dir / METADATA_FILE, metadata)
    sizes = ", ".join(f"{split}={sum(c)}" for split, c in counts.items())
    print(f"shards: {sizes} at {stored_input['input_size'][-1]} px in {output}")
    return metadata
