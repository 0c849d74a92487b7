"""Every image of every split, in one order: its split, index in the split, name, label, and embeddings of the
image and of its mirror image (pre-logit features, L2-normalized)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule

from skuvision.tasks.evaluate import sample_paths
from skuvision.tta import views


class MirrorEmbedder(LightningModule):
    """Pre-logit features of each image and of its horizontal mirror, from one decode of the batch."""

    def __init__(self, classifier: LightningModule):
        super().__init__()
        self.classifier = classifier

    def predict_step(self, batch, batch_idx: int):
        images, labels = batch
        plain, mirrored = (self.classifier.embed(view).float() for view in views(images, "flip"))
        return F.normalize(plain, dim=1), F.normalize(mirrored, dim=1), labels


@dataclass
class Catalogue:
    splits: list[str]  # split of each image
    index: np.ndarray  # index of each image within its split
    items: list[str]  # file path, or split[index] for in-memory sets
    labels: np.ndarray
    features: np.ndarray  # float32 (N, D), L2-normalized
    mirrored: np.ndarray  # the same for the mirrored images
    file_backed: bool

    def __len__(self) -> int:
        return len(self.items)

    def of_split(self, split: str) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.splits) == split)


def embed_catalogue(trainer, classifier, datamodule) -> Catalogue:
    """Runs the model over every split of the (set up) data module."""
    embedder = MirrorEmbedder(classifier)
    parts = {"splits": [], "index": [], "items": [], "labels": [], "features": [], "mirrored": []}
    paths_known = []
    for split, dataset in datamodule.splits.items():
        datamodule.predict_split = split
        outputs = trainer.predict(embedder, datamodule=datamodule)
        paths = sample_paths(dataset)
        paths_known.append(paths is not None)
        n = len(dataset)
        parts["splits"] += [split] * n
        parts["index"].append(np.arange(n))
        parts["items"] += paths or [f"{split}[{i}]" for i in range(n)]
        parts["features"].append(torch.cat([o[0] for o in outputs]).cpu().numpy())
        parts["mirrored"].append(torch.cat([o[1] for o in outputs]).cpu().numpy())
        parts["labels"].append(torch.cat([torch.as_tensor(o[2]) for o in outputs]).cpu().numpy())
    return Catalogue(
        splits=parts["splits"],
        index=np.concatenate(parts["index"]),
        items=parts["items"],
        labels=np.concatenate(parts["labels"]).astype(int),
        features=np.ascontiguousarray(np.concatenate(parts["features"]), dtype=np.float32),
        mirrored=np.ascontiguousarray(np.concatenate(parts["mirrored"]), dtype=np.float32),
        file_backed=all(paths_known),
    )
