"""From a model's logits to what a user reads, one way for eval, predict, the server and the demo, so they
agree on every attribute.

Per head (skuvision.models.heads): a label column's probabilities are softmax(logits / T) with its
temperature; a coarser level's are the sums of its finer level's calibrated probabilities (so the two never
disagree, with or without calibration); a tag column's are sigmoid(logits), and a tag is predicted where its
probability reaches that tag's threshold (0.5 without calibration).

The one-label model is the one head with column "": its outputs keep their earlier shapes elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from skuvision.models.heads import Head

DEFAULT_TAG_THRESHOLD = 0.5


def concat_batches(parts: Sequence):
    """Batches of a tensor, or of {column: tensor}, joined along the first dimension (on the CPU)."""
    if isinstance(parts[0], dict):
        return {key: torch.cat([p[key] for p in parts]).cpu() for key in parts[0]}
    return torch.cat(list(parts)).cpu()


def by_head(outputs) -> dict[str, torch.Tensor]:
    """{column: tensor}; the one-label model's tensor under ""."""
    return outputs if isinstance(outputs, dict) else {"": outputs}


def head_probs(
    heads: list[Head], logits, temperatures: dict[str, float] | None = None
) -> dict[str, torch.Tensor]:
    """{column: float64 probabilities}: calibrated softmax per label head, a coarser level summed from its
    source's calibrated probabilities, sigmoid per tag head. `temperatures`: {column: T} of trained label
    heads (missing: 1)."""
    logits = by_head(logits)
    temperatures = temperatures or {}
    probs: dict[str, torch.Tensor] = {}
    for head in heads:
        if head.kind == "tags":
            probs[head.column] = logits[head.column].double().sigmoid()
        elif not head.derived:
            t = float(temperatures.get(head.column, 1.0))
            probs[head.column] = (logits[head.column].double() / t).softmax(dim=1)
    for head in heads:
        if head.derived:
            source = probs[head.source]
            summed = torch.zeros(len(source), len(head.classes), dtype=source.dtype)
            probs[head.column] = summed.index_add_(1, torch.tensor(head.parents), source)
    return {h.column: probs[h.column] for h in heads}


@dataclass
class HeadAnswer:
    """One image's answer of one head: the top-k (label, probability), best first; for a tag column the
    predicted tags and their probabilities instead; `review` where a threshold says a person should look."""

    column: str
    kind: str
    ranked: list[tuple[str, float]]
    tags: list[tuple[str, float]] | None = None
    review: bool | None = None


def read_heads(
    heads: list[Head],
    probs: dict[str, torch.Tensor],
    top_k: int = 5,
    thresholds: dict[str, float | None] | None = None,
    tag_thresholds: dict[str, dict[str, float]] | None = None,
) -> list[list[HeadAnswer]]:
    """Per image, per head: what it answers. `thresholds`: {label column: the calibrated top-1 probability
    below which its answer goes to review (None: every answer does)}; a column not given has no review flag.
    `tag_thresholds`: {tag column: {tag: threshold}} (missing tags: 0.5)."""
    thresholds = thresholds or {}
    tag_thresholds = tag_thresholds or {}
    rows = len(next(iter(probs.values())))
    answers: list[list[HeadAnswer]] = [[] for _ in range(rows)]
    for head in heads:
        p = probs[head.column].float()
        k = min(top_k, p.shape[1])
        top_p, top_i = p.topk(k, dim=1)
        if head.kind == "tags":
            cut = torch.tensor(
                [
                    tag_thresholds.get(head.column, {}).get(name, DEFAULT_TAG_THRESHOLD)
                    for name in head.classes
                ]
            )
            chosen = p >= cut
        for i in range(rows):
            ranked = [(head.classes[j], q) for j, q in zip(top_i[i].tolist(), top_p[i].tolist(), strict=True)]
            answer = HeadAnswer(head.column, head.kind, ranked)
            if head.kind == "tags":
                order = p[i].argsort(descending=True).tolist()
                answer.tags = [(head.classes[j], p[i, j].item()) for j in order if chosen[i, j]]
            elif head.column in thresholds:
                threshold = thresholds[head.column]
                answer.review = threshold is None or ranked[0][1] < threshold
            answers[i].append(answer)
    return answers
