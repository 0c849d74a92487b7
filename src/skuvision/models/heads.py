"""Heads beside one backbone: one softmax head per label column, one sigmoid head per tag column, and the
coarser levels of a taxonomy read off a finer head.

A head is described by plain values (stored in the checkpoint's hyperparameters):
  {"column": "articleType", "kind": "label", "classes": [...]}
  {"column": "masterCategory", "kind": "label", "classes": [...], "source": "articleType", "parents": [...]}
  {"column": "tags", "kind": "tags", "classes": [...]}
A head with a `source` has no weights: its probabilities are the sums of its source head's over each coarse
class's members (`parents[i]` is the coarse class of source class i), so the two levels never disagree.

`MultiHead` takes the place of the timm model's classifier (the module `get_classifier()` returns), so timm's
`group_matcher` counts every head as the head stage: freezing, LR scales and layer decay apply to each head as
they do to a single classifier, and `forward_head(pre_logits=True)` still gives the embedding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.loss import AsymmetricLossMultiLabel
from torch import nn

from skuvision.errors import SkuvisionError

KINDS = ("label", "tags")
TAG_LOSSES = ("bce", "asl")
MISSING = -1  # a label column's target where the row has no value: masked out of that head's loss


@dataclass(frozen=True)
class Head:
    """One output of the model. `column` is "" for the single-label model's one head, whose metrics and
    columns keep their unprefixed names (`test/acc`)."""

    column: str
    kind: str
    classes: list[str]
    source: str | None = None
    parents: list[int] | None = field(default=None)

    @classmethod
    def from_spec(cls, spec: dict) -> Head:
        if spec.get("kind") not in KINDS:
            raise SkuvisionError(
                f"head {spec.get('column')!r}: kind {spec.get('kind')!r} is not one of {KINDS}"
            )
        return cls(
            column=str(spec["column"]),
            kind=spec["kind"],
            classes=[str(c) for c in spec["classes"]],
            source=spec.get("source"),
            parents=[int(p) for p in spec["parents"]] if spec.get("parents") is not None else None,
        )

    @property
    def derived(self) -> bool:
        return self.source is not None

    def key(self, stage: str, metric: str) -> str:
        """`val/acc` for the single head, `val/<column>/acc` for a column's."""
        return f"{stage}/{self.column}/{metric}" if self.column else f"{stage}/{metric}"


def heads_from_specs(specs: list[dict]) -> list[Head]:
    heads = [Head.from_spec(dict(s)) for s in specs]
    names = {h.column for h in heads}
    if len(names) != len(heads):
        raise SkuvisionError(f"a column is named twice among the heads {[h.column for h in heads]}")
    for head in heads:
        if not head.column or "." in head.column:
            raise SkuvisionError(
                f"column {head.column!r} cannot name a head: rename the column without dots (or empty name)"
            )
    for head in heads:
        if head.derived:
            source = next((h for h in heads if h.column == head.source), None)
            if source is None or source.kind != "label" or source.derived:
                raise SkuvisionError(
                    f"head {head.column!r} is read off {head.source!r}, which is not a trained label head "
                    f"among {sorted(names)}"
                )
            if len(head.parents or []) != len(source.classes):
                raise SkuvisionError(
                    f"head {head.column!r}: {len(head.parents or [])} parents for the "
                    f"{len(source.classes)} classes of {head.source!r}"
                )
    return heads


def members(head: Head, num_source_classes: int) -> torch.Tensor:
    """(source classes, coarse classes) 0/1 matrix: which fine classes make up each coarse class."""
    matrix = torch.zeros(num_source_classes, len(head.classes))
    matrix[torch.arange(num_source_classes), torch.tensor(head.parents)] = 1.0
    return matrix


class MultiHead(nn.Module):
    """Pre-logit features -> {column: logits} of the trained heads, linear layers named by their column (so
    timm's head matcher covers them). `complete` adds the derived heads: their "logits" are log-probabilities,
    the log of the summed source probabilities, which softmax, argmax and cross-entropy read as any head's
    logits. Test-time augmentation averages the trained heads' logits first and completes after, so the
    levels agree under it too."""

    def __init__(self, in_features: int, heads: list[Head]):
        super().__init__()
        self.heads = heads
        self.layers = nn.ModuleDict(
            {h.column: nn.Linear(in_features, len(h.classes)) for h in heads if not h.derived}
        )
        sizes = {h.column: len(h.classes) for h in heads}
        self.derived = [h for h in heads if h.derived]
        # 0/1, not its log: weight averaging (EMA) averages buffers too, and -inf - -inf is NaN.
        for i, head in enumerate(self.derived):
            self.register_buffer(f"members_{i}", members(head, sizes[head.source]), persistent=False)

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {column: layer(features) for column, layer in self.layers.items()}

    def complete(self, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every head's output, in head order: the trained ones as given, the derived ones added."""
        out = dict(out)
        for i, head in enumerate(self.derived):
            log_probs = F.log_softmax(out[head.source].float(), dim=-1)
            outside = getattr(self, f"members_{i}")[None] == 0
            out[head.column] = torch.logsumexp(log_probs[:, :, None].masked_fill(outside, -torch.inf), dim=1)
        return {h.column: out[h.column] for h in self.heads}


def replace_classifier(backbone: nn.Module, heads: list[Head]) -> MultiHead:
    """Put a MultiHead where the timm model's classifier is; its input width is the classifier's."""
    classifier = backbone.get_classifier()
    in_features = getattr(classifier, "in_features", None) or getattr(backbone, "num_features", None)
    if isinstance(classifier, nn.Conv2d) or not in_features:
        raise SkuvisionError(
            f"{type(backbone).__name__}: its classifier ({type(classifier).__name__}) is not a linear layer "
            "that several heads can replace; use another model for data.label_columns/tag_columns"
        )
    multi = MultiHead(int(in_features), heads)
    set_classifier(backbone, multi)
    return multi


def set_classifier(backbone: nn.Module, layer: nn.Module) -> None:
    """Put `layer` where the backbone's classifier (the module `get_classifier()` returns) is."""
    classifier = backbone.get_classifier()
    path = next(name for name, module in backbone.named_modules() if module is classifier)
    parent_path, _, attr = path.rpartition(".")
    setattr(backbone.get_submodule(parent_path) if parent_path else backbone, attr, layer)


class HeadLosses(nn.Module):
    """The training loss: the sum over trained heads. A label head's loss is the (class-weighted,
    label-smoothed) cross-entropy over the rows that have its column's value; rows without one add nothing
    and get no gradient from it. A tag head's is BCE, or timm's asymmetric loss (computed in float32, so it
    stays finite under bf16/fp16 autocast), averaged over rows and tags."""

    def __init__(
        self,
        heads: list[Head],
        label_smoothing: float = 0.0,
        class_weights: dict[str, list[float]] | None = None,
        tag_loss: str = "bce",
    ):
        super().__init__()
        if tag_loss not in TAG_LOSSES:
            raise SkuvisionError(f"tag_loss={tag_loss!r}: use one of {', '.join(TAG_LOSSES)}")
        self.heads = [h for h in heads if not h.derived]
        self.label_smoothing = label_smoothing
        for h in self.heads:
            weights = (class_weights or {}).get(h.column)
            if weights is not None:
                self.register_buffer(f"weight_{h.column}", torch.tensor(weights, dtype=torch.float32))
        self.tag_loss = tag_loss
        self.asl = AsymmetricLossMultiLabel(reduction="mean") if tag_loss == "asl" else None

    def head_loss(self, head: Head, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        if head.kind == "tags":
            target = target.float()
            if self.asl is not None:
                return self.asl(logits, target)
            return F.binary_cross_entropy_with_logits(logits, target)
        weight = getattr(self, f"weight_{head.column}", None)
        per_row = F.cross_entropy(
            logits,
            target,
            weight=weight,
            ignore_index=MISSING,
            label_smoothing=self.label_smoothing,
            reduction="none",
        )
        # The weighted mean over rows with a value; a batch with none gives 0 (not NaN) and no sync.
        present = (target != MISSING).float()
        row_weight = present if weight is None else weight[target.clamp(min=0)] * present
        return per_row.sum() / row_weight.sum().clamp(min=1e-12)

    def forward(self, outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(self.head_loss(h, outputs[h.column], targets[h.column]) for h in self.heads)
