"""The one way a task gets pre-logit embeddings from a checkpoint: `extract` runs one Trainer.predict pass
of `WithFeatures` (the Classifier wrapped) and gives each image's embedding (float32, as the head sees it,
no TTA), the same L2-normalized (what the index, the unknown score and the prototypes compare) and, when
asked, the Classifier's own predict_step logits (with its TTA) from that same pass, with each batch's meta
(labels, or the files' read errors).

embed.py, embed.py add_to=, eval.py's unknown-product reference and scores, predict.py's unknown= and
prototypes=, and the prototypes' class examples and centring mean all read embeddings through it, so every
one of them normalizes and pools alike. (The sharded runs of shards.py store the Classifier's
`predict_embeddings` outputs, its `embed` too, and normalize them on merge with `normalized`.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pytorch_lightning import LightningModule

from skuvision.readout import concat_batches


def normalized(embeddings: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length: the features every comparison (cosine, kNN) uses."""
    return F.normalize(embeddings.float(), dim=1)


class WithFeatures(LightningModule):
    """The Classifier for Trainer.predict: with `logits` its own predict_step ("outputs": logits with its
    TTA; "meta"), with `features` each image's "embedding" and "features" (the same normalized)."""

    def __init__(self, classifier: LightningModule, logits: bool = True, features: bool = True):
        super().__init__()
        self.classifier = classifier
        self.logits = logits
        self.features = features

    def predict_step(self, batch, batch_idx: int) -> dict:
        if not self.features:
            return self.classifier.predict_step(batch, batch_idx)
        images, meta = batch if isinstance(batch, (tuple, list)) else (batch, None)
        out = {"meta": meta}
        if self.logits:  # one backbone pass for both (Classifier.logits_and_embedding)
            logits, embedding = self.classifier.logits_and_embedding(images, self.classifier.tta)
            out["outputs"] = as_float32(logits)
        else:
            embedding = self.classifier.embed(images)
        out["embedding"] = embedding.float()
        out["features"] = normalized(out["embedding"])
        return out


def as_float32(logits):
    """Logits as predict_step hands them on: float32, a tensor or {column: tensor}."""
    return {k: v.float() for k, v in logits.items()} if isinstance(logits, dict) else logits.float()


@dataclass
class Extracted:
    """One pass's results on the CPU, in the data module's order; None where not asked for."""

    logits: torch.Tensor | dict | None
    embeddings: torch.Tensor | None  # (N, D) float32
    features: torch.Tensor | None  # (N, D) float32, L2-normalized
    metas: list  # each batch's meta as the data module gave it

    def per_image(self, column: str | None = None) -> list:
        """Each image's meta: its label (with several heads, `column`'s), or its read error."""
        if self.metas and isinstance(self.metas[0], dict):
            return concat_batches(self.metas)[column].tolist()
        return [m for meta in self.metas for m in (meta.tolist() if torch.is_tensor(meta) else meta)]


def extract(trainer, module, datamodule, logits: bool = False, features: bool = True) -> Extracted:
    """One Trainer.predict pass of `module` (a Classifier) over `datamodule`'s predict split."""
    if logits and getattr(module, "predict_embeddings", False):
        raise ValueError("extract: the Classifier's predict_embeddings is on: its logits would be features")
    outputs = trainer.predict(WithFeatures(module, logits, features), datamodule=datamodule)
    embeddings = vectors = None
    if features:
        embeddings, vectors = (
            (torch.cat([o[key] for o in outputs]).cpu() for key in ("embedding", "features"))
            if outputs
            else (torch.zeros(0, 0), torch.zeros(0, 0))
        )
    return Extracted(
        logits=concat_batches([o["outputs"] for o in outputs]) if logits else None,
        embeddings=embeddings,
        features=vectors,
        metas=[o["meta"] for o in outputs],
    )
