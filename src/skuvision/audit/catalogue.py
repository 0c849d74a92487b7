"""Every image of every split, in one order: its split, index in the split, name, label, its pre-logit
embedding (what the classifier head sees: for label issues) and a duplicate descriptor of it and of its
mirror image.

Descriptors (audit.descriptor), measured on copies of real Fashion-MNIST images (upscaled to 56 px, saved as
JPEG quality 70, read back at 28 px) against each image's nearest distinct image, both centered:
- `pixels` (default): the model's input average-pooled to grid x grid per channel. At grid 14, copies score
  0.987-0.999 (median 0.9965) and the nearest distinct image 0.938 at the median, 0.988 at the 99th
  percentile: copies stand apart.
- `features`: the last feature map pooled to grid x grid (grid 4: copies 0.79-0.97, distinct 0.91 median).
- `embedding`: the pre-logit embedding, made to tell classes apart, so it hardly tells two shirts apart
  (copies 0.88-0.99, distinct 0.974 median): similar products, not copies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule

from skuvision.tta import views

log = logging.getLogger("skuvision")


DESCRIPTORS = ("pixels", "features", "embedding")


class AuditEmbedder(LightningModule):
    """Per batch: pre-logit embeddings, and duplicate descriptors of the images and of their mirror images."""

    def __init__(self, classifier: LightningModule, descriptor: str, grid: int):
        super().__init__()
        self.classifier = classifier
        self.descriptor = descriptor
        self.grid = grid

    def predict_step(self, batch, batch_idx: int):
        images, labels = batch
        backbone = self.classifier.backbone
        out = {"labels": labels}
        for name, view in zip(("plain", "mirrored"), views(images, "flip"), strict=True):
            feature_map = backbone.forward_features(view)
            if name == "plain":
                out["embedding"] = backbone.forward_head(feature_map, pre_logits=True).float()
            if self.descriptor == "pixels":
                out[name] = F.adaptive_avg_pool2d(view, self.grid).flatten(1).float()
            elif self.descriptor == "features" and feature_map.ndim == 4:
                out[name] = F.adaptive_avg_pool2d(feature_map, self.grid).flatten(1).float()
            else:  # embedding, or a feature map without a spatial layout (tokens)
                out[name] = backbone.forward_head(feature_map, pre_logits=True).float()
        return out


@dataclass
class Catalogue:
    splits: list[str]  # split of each image
    index: np.ndarray  # index of each image within its split
    items: list[str]  # file path, or split[index] for in-memory sets
    labels: np.ndarray
    embeddings: np.ndarray  # float32 (N, D): pre-logit features
    descriptors: np.ndarray  # float32 (N, E): duplicate descriptors
    mirrored: np.ndarray  # the same for the mirror images
    file_backed: bool
    # A table with several columns: {label column: class index or -1, tag column: (N, T) multi-hot}; `labels`
    # is then its first label column's
    targets: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.items)

    def of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.splits) == split)


def embed_catalogue(trainer, classifier, datamodule, descriptor: str, grid: int) -> Catalogue:
    """Runs the model over every split of the (set up) data module."""
    embedder = AuditEmbedder(classifier, descriptor, grid)
    parts: dict[str, list] = {key: [] for key in ("splits", "index", "items", "labels")}
    targets: dict[str, list] = {}
    arrays: dict[str, list] = {key: [] for key in ("embedding", "plain", "mirrored")}
    paths_known = []
    for split, dataset in datamodule.splits.items():
        datamodule.predict_split = split
        outputs = trainer.predict(embedder, datamodule=datamodule)
        paths = datamodule.sample_paths(split)
        paths_known.append(paths is not None)
        n = len(dataset)
        parts["splits"] += [split] * n
        parts["index"].append(np.arange(n))
        parts["items"] += paths or [f"{split}[{i}]" for i in range(n)]
        if isinstance(outputs[0]["labels"], dict):  # a table's columns
            for column in outputs[0]["labels"]:
                values = torch.cat([o["labels"][column] for o in outputs]).cpu().numpy()
                targets.setdefault(column, []).append(values)
            parts["labels"].append(np.asarray(datamodule.split_labels(split)))
        else:
            parts["labels"].append(torch.cat([torch.as_tensor(o["labels"]) for o in outputs]).cpu().numpy())
        for key in arrays:
            arrays[key].append(torch.cat([o[key] for o in outputs]).cpu().numpy())

    def stacked(key: str) -> np.ndarray:
        return np.ascontiguousarray(np.concatenate(arrays[key]), dtype=np.float32)

    return Catalogue(
        splits=parts["splits"],
        index=np.concatenate(parts["index"]),
        items=parts["items"],
        labels=np.concatenate(parts["labels"]).astype(int),
        embeddings=stacked("embedding"),
        descriptors=stacked("plain"),
        mirrored=stacked("mirrored"),
        file_backed=all(paths_known),
        targets={column: np.concatenate(values) for column, values in targets.items()} or None,
    )
