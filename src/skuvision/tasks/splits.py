"""A split of a trained model's data through Trainer.predict, for predict.py and embed.py (`split=`): the
model's outputs for every image of the split once, in the split's stored order, with each image's label.

A split of files (image folder, manifest) is named by its paths; one of litdata shards (data=streaming) or
held in memory (Fashion-MNIST, CIFAR) by `<split>[<index>]`, the index being its row in the stored order
(for litdata, the `index` shard.py stored beside each image). On several processes, or with shards=true,
the outputs go through skuvision.shards, so a rerun into the same run folder skips the finished shards.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torchvision.transforms.v2.functional import to_pil_image

from skuvision.data.datasets import dataset_labels
from skuvision.data.streaming import StreamingDataModule
from skuvision.errors import SkuvisionError
from skuvision.features import extract
from skuvision.readout import concat_batches
from skuvision.shards import plan_of, predict_in_shards, predict_split_in_shards, sharded


@dataclass
class SplitOutputs:
    """`outputs`: logits or features ({column: tensor} with several heads), one row per item; `errors`: each
    image's read error ("" when read); `labels`: each image's label (list of class indices), or with several
    heads {column: tensor of class indices (-1: none), or multi-hot tags}; `items`: the images' names."""

    outputs: torch.Tensor | dict
    errors: list[str]
    labels: list[int] | dict
    items: list[str]
    files: bool  # items are file paths


def split_items(split: str, count: int) -> list[str]:
    """The names of a split's images that are not files of their own: `<split>[<position>]`."""
    return [f"{split}[{i}]" for i in range(count)]


def split_plan(cfg: DictConfig, trainer, datamodule) -> dict:
    """What decides a split's shards besides the checkpoint: the split, its data and the precision (with
    litdata shards, a SHA-256 of their metadata: classes, counts, encoding)."""
    plan = {"split": cfg.split, "data_root": str(datamodule.root), "precision": str(trainer.precision)}
    if isinstance(datamodule, StreamingDataModule):
        metadata = json.dumps(datamodule.metadata, sort_keys=True).encode()
        plan["shards_metadata_sha256"] = hashlib.sha256(metadata).hexdigest()
    return plan


def prepared_split(datamodule, split: str) -> None:
    """The data module set up for predicting `split`, refused in one line where it has no such split."""
    datamodule.prepare_data()
    datamodule.setup("predict")
    if split not in datamodule.splits:
        raise SkuvisionError(f"split={split}: choose one of {sorted(datamodule.splits)}")


def split_outputs(cfg: DictConfig, trainer, module, datamodule, task: str, **settings) -> SplitOutputs | None:
    """The module's predict outputs (logits, or with `predict_embeddings` its raw embeddings) for every image
    of split `cfg.split` of `datamodule` (prepared_split), in the split's order: in shards
    (skuvision.shards; `settings` join the plan) when several processes run or shards=true, else in one
    pass (skuvision.features.extract). None on ranks other than zero, which write nothing."""
    from skuvision.data.stream_positions import StreamPositionsDataModule, stored_count

    split = cfg.split
    dataset = datamodule.splits[split]
    paths = datamodule.sample_paths(split)
    streaming = isinstance(datamodule, StreamingDataModule)
    count = stored_count(datamodule, split) if streaming else len(dataset)
    items = paths or split_items(split, count)
    if sharded(cfg, trainer):
        plan = plan_of(task, cfg.ckpt_path, items, **settings, **split_plan(cfg, trainer, datamodule))
        if paths is None:
            merged = predict_split_in_shards(cfg, trainer, module, datamodule, split, items, plan)
            return None if merged is None else SplitOutputs(*merged, items, False)
        merged = predict_in_shards(cfg, trainer, module, [Path(p) for p in paths], plan)
        if merged is None:
            return None
        return SplitOutputs(*merged, file_split_labels(datamodule, split), items, True)
    # One pass through the one extractor: embed.py's raw embeddings, or predict.py's logits (with TTA).
    embeddings = bool(getattr(module, "predict_embeddings", False))
    if streaming:  # litdata's order need not be the stored one: each sample carries its index
        stream = StreamPositionsDataModule(datamodule, split, cfg.batch_size, cfg.num_workers)
        found = extract(trainer, module, stream, logits=not embeddings, features=embeddings)
        index = torch.cat([meta["index"] for meta in found.metas])
        if sorted(index.tolist()) != list(range(count)):
            raise SkuvisionError(f"split={split}: the stream did not yield each stored image once")
        order = torch.argsort(index)
        out = found.embeddings if embeddings else found.logits
        out = {k: v[order] for k, v in out.items()} if isinstance(out, dict) else out[order]
        labels = torch.cat([meta["label"] for meta in found.metas])[order].tolist()
        return SplitOutputs(out, [""] * count, labels, items, False)
    found = extract(trainer, module, datamodule, logits=not embeddings, features=embeddings)
    metas = found.metas
    labels = concat_batches(metas) if metas and isinstance(metas[0], dict) else torch.cat(metas).tolist()
    out = found.embeddings if embeddings else found.logits
    return SplitOutputs(out, [""] * count, labels, items, bool(paths))


def file_split_labels(datamodule, split: str) -> list[int] | dict:
    """The labels of a split of files, read from the data module without decoding an image."""
    if datamodule.heads is None:
        return dataset_labels(datamodule.splits[split])
    targets = datamodule.splits_targets(split)
    columns = [h["column"] for h in datamodule.heads]
    return {c: torch.stack([torch.as_tensor(t[c]) for t in targets]) for c in columns}


def first_labels(labels: list[int] | dict, module) -> list[int]:
    """With several heads, the first one's labels (what embed.py's retrieval report scores)."""
    return labels[module.heads[0].column].tolist() if isinstance(labels, dict) else labels


def with_truth(header: list[str], rows: list[list[str]], labels, datamodule, separator: str) -> tuple:
    """predictions.csv with each image's true label after `error`, as eval.py's predictions.csv names it:
    `true` for one label per image; with several columns `<column>_true` per column (a tag column's tags
    joined by `separator`). Names are the data's own (a data= override may order its classes otherwise than
    the checkpoint); a row without a value (-1) gets an empty cell."""
    if not isinstance(labels, dict):
        names = list(datamodule.class_names)
        columns = ["true"]
        cells = [[names[k] if 0 <= k < len(names) else ""] for k in labels]
    else:
        heads = datamodule.heads
        columns = [f"{h['column']}_true" for h in heads]
        per_head = []
        for head in heads:
            values, classes = labels[head["column"]], head["classes"]
            if head["kind"] == "tags":
                on = [[c for c, v in zip(classes, row, strict=True) if v] for row in values.tolist()]
                per_head.append([separator.join(tags) for tags in on])
            else:
                per_head.append([classes[k] if k >= 0 else "" for k in values.tolist()])
        cells = [list(row) for row in zip(*per_head, strict=True)]
    at = header.index("error") + 1
    merged = [*header[:at], *columns, *header[at:]]
    if len(set(merged)) < len(merged):
        raise SkuvisionError(
            f"predictions.csv would name a column twice in {merged}: rename the table's columns "
            "(split= adds <column>_true)"
        )
    return merged, [[*row[:at], *truth, *row[at:]] for row, truth in zip(rows, cells, strict=True)]


def split_pictures(datamodule, split: str) -> Callable[[int], Callable] | None:
    """For a split whose images are not files: a function giving the i-th image's picture for the gallery
    (called only for the tiles shown), where the source holds its images in memory; None for a split of
    litdata shards, whose stored order is reachable only by reading the whole split."""
    if isinstance(datamodule, StreamingDataModule):
        return None
    dataset = datamodule.splits[split]
    return lambda i: partial(dataset_picture, dataset, i)


def dataset_picture(dataset, i: int) -> Image.Image:
    return to_pil_image(dataset[i][0])
