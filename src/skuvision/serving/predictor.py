"""One image's bytes -> its top-k labels (with several heads, every attribute's) and, with a catalogue index,
its most similar catalogue items.

The same steps as predict.py: decoded like `open_rgb`, timm's eval transform, the batched uint8 -> normalized
step, and the checkpoint's test-time augmentation. Two backends run the model: the checkpoint in torch, or
export.py's ONNX graph (which takes uint8 images at the model's size and normalizes them itself; with several
heads it has one output per head, named by its column).

A model with several heads answers every attribute through skuvision.readout, as predict.py does. The server
applies no calibration (neither does it for one label): probabilities are T = 1, tags cut at 0.5.

With prototypes (skuvision.prototypes), new classes are ranked beside the trained ones, as predict.py ranks
them, and every label entry says its `source`: "head" or "prototype".
"""

from __future__ import annotations

import base64
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from skuvision.checkpoints import load_classifier, read_checkpoint, upgraded_hparams
from skuvision.data.datasets import InputImageFiles
from skuvision.data.decode import DECODE_ERRORS, ImageOverBudget
from skuvision.data.transforms import ToModelInput
from skuvision.errors import SkuvisionError
from skuvision.explain import Explainer, overlay
from skuvision.features import normalized
from skuvision.models.heads import Head, heads_from_specs
from skuvision.outputs import file_sha256
from skuvision.prototypes import load as load_prototypes
from skuvision.readout import head_probs, read_heads
from skuvision.serving.catalogue import catalogue_root, public_name
from skuvision.tta import check_tta, tta_logits

log = logging.getLogger("skuvision")

BACKENDS = ("torch", "onnx")


class BadImage(ValueError):
    """An upload that is not a decodable image: the client's fault, answered with `status`."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def find_onnx(ckpt_path: str | Path, onnx_path: str | None) -> Path:
    """export.py's model.onnx: the one named, else beside the checkpoint or in its run folder."""
    if onnx_path:
        found = Path(onnx_path).expanduser()
        if not found.is_file():
            raise SkuvisionError(f"serve.onnx_path={found}: no such file; run export.py ckpt_path=... first")
        candidates = [found]
    else:
        ckpt = Path(ckpt_path).expanduser()
        candidates = [
            p / "model.onnx" for p in (ckpt.parent, ckpt.parent.parent) if (p / "model.onnx").is_file()
        ]
        if not candidates:
            run = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
            raise SkuvisionError(
                f"serve.backend=onnx: no model.onnx beside {ckpt} or in its run folder; run `python "
                f"export.py ckpt_path={ckpt} output={run / 'model.onnx'}` or set serve.onnx_path to the "
                "model.onnx export.py wrote"
            )
    if not candidates[0].with_suffix(".json").is_file():
        raise SkuvisionError(f"{candidates[0]}: model.json is missing beside it (export.py writes both)")
    if not onnx_path:  # found, not named: it must be this checkpoint's export, not a sibling's
        exported = json.loads(candidates[0].with_suffix(".json").read_text()).get("checkpoint")
        if exported and Path(exported).name != Path(ckpt_path).name:
            raise SkuvisionError(
                f"serve.backend=onnx: {candidates[0]} was exported from {Path(exported).name}, not "
                f"ckpt_path={ckpt_path}: give ckpt_path={exported} (or its run folder's), or "
                "serve.onnx_path to this checkpoint's export"
            )
    return candidates[0]


@dataclass
class ModelCard:
    """What a client and the demo page need to know about the model being served (plain values)."""

    name: str
    checkpoint: str
    sha256: str
    class_names: list[str]
    input_config: dict
    data: dict
    backend: str
    tta: str
    onnx_path: str | None = None
    heads: list[dict] | None = None  # the head specs of a model with several (skuvision.models.heads)
    prototypes: str | None = None  # a prototypes.npz of this checkpoint: new classes (skuvision.prototypes)

    def model_heads(self) -> list[Head]:
        """Every head; the one-label model's one head has column ""."""
        if self.heads is None:
            return [Head(column="", kind="label", classes=self.class_names)]
        return heads_from_specs(self.heads)


def model_card(ckpt_path: str, backend: str = "torch", onnx_path: str | None = None, tta: str | None = None):
    """Read from the checkpoint (memory-mapped, no model built), checked against model.json for ONNX."""
    if backend not in BACKENDS:
        raise SkuvisionError(f"serve.backend={backend}: use one of {', '.join(BACKENDS)}")
    hparams = read_checkpoint(ckpt_path)["hyper_parameters"]
    hparams = {**hparams, **upgraded_hparams(hparams)}
    card = ModelCard(
        name=str(hparams["model"].get("name", hparams["model"].get("_target_"))),
        checkpoint=str(Path(ckpt_path).expanduser()),
        sha256=file_sha256(Path(ckpt_path).expanduser())[:12],
        class_names=list(hparams["class_names"]),
        input_config=dict(hparams["input_config"]),
        data=dict(hparams["data"]),
        backend=backend,
        tta=check_tta(tta or hparams.get("tta") or "none"),
        heads=[dict(h) for h in hparams["heads"]] if hparams.get("heads") else None,
    )
    if backend == "onnx":
        onnx = find_onnx(ckpt_path, onnx_path)
        meta = json.loads(onnx.with_suffix(".json").read_text())
        if meta.get("class_names") != card.class_names or meta.get("input") != card.input_config:
            raise SkuvisionError(
                f"{onnx}: its model.json (classes, input config) does not match ckpt_path={ckpt_path}; "
                "export this checkpoint again"
            )
        card.onnx_path = str(onnx)
        if card.heads is not None:  # refused here, before a server binds, rather than in its worker
            import onnx as onnx_format

            graph = onnx_format.load(str(onnx), load_external_data=False).graph
            widths = {o.name: o.type.tensor_type.shape.dim[-1].dim_value or None for o in graph.output}
            onnx_head_outputs(widths, card.model_heads(), onnx)
    return card


def onnx_head_outputs(widths: dict[str, int | None], heads: list[Head], onnx_path) -> list[str]:
    """The graph outputs to read: one per trained head, named by its column and as wide as its classes (a
    derived head's output, where the export has one, is not read: its probabilities are summed from its
    source's, as readout does for torch)."""
    trained = [h for h in heads if not h.derived]
    wrong = [
        h.column for h in trained if h.column not in widths or widths[h.column] not in (None, len(h.classes))
    ]
    if wrong:
        raise SkuvisionError(
            f"{onnx_path}: its outputs {sorted(widths)} have no output per head for {wrong} (named by the "
            "column, as wide as its classes): export this checkpoint again with export.py"
        )
    return [h.column for h in trained]


class Predictor:
    """A model card's model on one device, and optionally a catalogue index: decode, then run in batches."""

    def __init__(
        self, card: ModelCard, index=None, top_k: int = 5, k: int = 5, device: str = "cpu", unknown=None
    ):
        self.card = card
        self.index = index
        self.unknown = unknown  # a skuvision.unknown.Detector: unknown_score and unknown in every answer
        self.catalogue_root = catalogue_root(index.items) if index is not None else None
        self.embedded: torch.Tensor | None = None  # the last batch's raw features, with prototypes
        self.prototypes = (
            load_prototypes(Path(card.prototypes), card.checkpoint, card.class_names)
            if card.prototypes
            else None
        )
        names = self.prototypes.names if self.prototypes else card.class_names
        self.top_k = min(int(top_k), len(names))
        self.requested_top_k = int(top_k)  # per head, at most its classes (readout)
        self.heads = card.model_heads()
        self.onnx_outputs: list[str] | None = None  # None: the one-label graph's first output
        self.k = min(int(k), len(index)) if index is not None else int(k)
        self.device = torch.device(device)
        self.to_model_input = ToModelInput(card.input_config).to(self.device)
        self.module = None
        self.session = None
        self.explainer: Explainer | None = None  # made at the first explain=true request
        # the embeddings (similar items, the unknown score, prototypes) come from torch
        if card.backend == "torch" or index is not None or unknown is not None or self.prototypes:
            self.module = load_classifier(card.checkpoint, map_location=self.device).eval()
        if card.backend == "onnx":
            import onnxruntime as ort

            providers = ["CPUExecutionProvider"]
            if self.device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, "CUDAExecutionProvider")
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            self.session = ort.InferenceSession(card.onnx_path, options, providers=providers)
            if card.heads is not None:
                widths = {
                    o.name: o.shape[-1] if isinstance(o.shape[-1], int) else None
                    for o in self.session.get_outputs()
                }
                self.onnx_outputs = onnx_head_outputs(widths, self.heads, card.onnx_path)
        if index is not None and index.dim != self.embedding_dim():
            raise SkuvisionError(
                f"index: its vectors have {index.dim} dimensions, this model's embeddings "
                f"{self.embedding_dim()}; build the index with embed.py from this checkpoint"
            )

    def embedding_dim(self) -> int:
        c, h, w = self.card.input_config["input_size"]
        with torch.inference_mode():
            return int(self.module.embed(torch.zeros(1, c, h, w, device=self.device)).shape[1])

    def decode(self, data: bytes) -> torch.Tensor:
        """Image bytes -> uint8 (C, H, W) at the model's size, exactly as predict.py reads a file (the same
        dataset class: reduced-scale JPEG decoding, EXIF orientation, the pixel budget, the eval transform);
        BadImage if they are not one (413 if they would decode to more pixels than the budget)."""
        if not data:
            raise BadImage("empty body: no image bytes were sent")
        try:
            return InputImageFiles([io.BytesIO(data)], self.card.input_config).decode(0)
        except ImageOverBudget as err:
            raise BadImage(str(err), status=413) from None
        except UnidentifiedImageError:
            raise BadImage("not an image: no image format recognized in the bytes sent") from None
        except DECODE_ERRORS as err:
            raise BadImage(f"not a decodable image ({type(err).__name__}: {err})"[:300]) from None

    @torch.inference_mode()
    def logits_and_features(self, images: torch.Tensor) -> tuple:
        """uint8 batch at the model's size -> float32 logits (TTA as configured; {column: logits} with several
        heads, the ONNX graph's trained heads only), L2-normalized features (with an index, an unknown score
        or prototypes, else None); with prototypes, the raw features are kept in `self.embedded` for
        answer()."""
        images = images.to(self.device)
        features = logits = None
        if self.module is not None:
            x = self.to_model_input(images)
            if self.index is not None or self.unknown is not None or self.prototypes is not None:
                if self.session is None:  # one backbone pass for the logits and the embedding
                    logits, embedded = self.module.logits_and_embedding(x, self.card.tta)
                else:
                    embedded = self.module.embed(x)
                embedded = embedded.float().cpu()
                self.embedded = embedded if self.prototypes is not None else None
                features = normalized(embedded)
        if self.session is not None:
            # The graph takes uint8: views are made in float (replicate padding has no uint8 kernel) and are
            # exact integers, so casting back loses nothing. Each head's logits are averaged over the views.
            logits = tta_logits(
                lambda view: self.run_onnx(view.round().to(torch.uint8)), images.float(), self.card.tta
            )
        elif logits is None:
            logits = self.module.predict_logits(x, self.card.tta)
        if isinstance(logits, dict):
            return {column: value.float().cpu() for column, value in logits.items()}, features
        return logits.float().cpu(), features

    def run_onnx(self, batch: torch.Tensor):
        feed = {"images": batch.cpu().numpy()}
        if self.onnx_outputs is None:
            return torch.from_numpy(self.session.run(None, feed)[0])
        values = self.session.run(self.onnx_outputs, feed)
        return {column: torch.from_numpy(v) for column, v in zip(self.onnx_outputs, values, strict=True)}

    def answer(self, images: torch.Tensor) -> list[dict]:
        """One JSON-ready answer per image of the batch: labels best first, and similar items. With several
        heads, "attributes" holds every column's answer and "labels" is the first label column's."""
        logits, features = self.logits_and_features(images)
        if self.card.heads is None and self.prototypes is not None:
            probs = self.prototypes.combined_probs(logits.double().softmax(dim=1), self.embedded).float()
            probs, top = probs.topk(self.top_k, dim=1)
            names, source = self.prototypes.names, self.prototypes.source
            answers = [
                {
                    "labels": [
                        {"label": names[j], "prob": round(p, 6), "source": source(j)}
                        for j, p in zip(t, q, strict=True)
                    ]
                }
                for t, q in zip(top.tolist(), probs.tolist(), strict=True)
            ]
        elif self.card.heads is None:
            probs, top = logits.softmax(dim=1).topk(self.top_k, dim=1)
            names = self.card.class_names
            answers = [
                {"labels": [{"label": names[j], "prob": round(p, 6)} for j, p in zip(t, q, strict=True)]}
                for t, q in zip(top.tolist(), probs.tolist(), strict=True)
            ]
        else:
            answers = self.attribute_answers(logits)
        if self.unknown is not None:
            values = self.unknown.scores(logits, features, self.heads)
            for answer, value in zip(answers, values.tolist(), strict=True):
                answer.update(unknown_score=round(value, 6), unknown=value > self.unknown.threshold)
        if self.index is not None:
            scores, indices = self.index.search(
                np.ascontiguousarray(features.numpy(), dtype=np.float32), self.k
            )
            for answer, row_scores, row_indices in zip(answers, scores, indices, strict=True):
                answer["similar"] = [
                    self.catalogue_item(int(i), float(s))
                    for s, i in zip(row_scores, row_indices, strict=True)
                    if i >= 0
                ]
        for answer in answers:
            answer.update(model=self.card.name, sha256=self.card.sha256, backend=self.card.backend)
        return answers

    def attribute_answers(self, logits: dict[str, torch.Tensor]) -> list[dict]:
        """{"labels": the first label column's top-k, "attributes": {column: {"labels": top-k}} and, for a tag
        column, {"tags": the predicted tags, "labels": the top-k tag probabilities}} per image."""
        first = next(h.column for h in self.heads if h.kind == "label")
        answers = []
        for image in read_heads(self.heads, head_probs(self.heads, logits), self.requested_top_k):
            attributes = {}
            for head in image:
                ranked = [{"label": label, "prob": round(p, 6)} for label, p in head.ranked]
                tags = [{"tag": tag, "prob": round(p, 6)} for tag, p in head.tags or []]
                attributes[head.column] = (
                    {"tags": tags, "labels": ranked} if head.kind == "tags" else {"labels": ranked}
                )
            answers.append({"labels": attributes[first]["labels"], "attributes": attributes})
        return answers

    def explain(self, images: torch.Tensor, answers: list[dict]) -> list[dict]:
        """Per image, the Grad-CAM overlay (PNG, base64) of the label its answer ranks first (the first label
        column's with several heads), at the model's input size. The torch backend only: an ONNX graph has no
        gradients (BadImage-style refusal is the caller's, per request)."""
        if self.card.backend != "torch":
            raise BadImage("explain=true needs the torch backend; this server runs serve.backend=onnx")
        if self.explainer is None:
            self.explainer = Explainer(self.module)
        column = self.explainer.column
        classes = next(h.classes for h in self.heads if h.kind == "label" and h.column == (column or ""))
        tops = [a["labels"][0]["label"] for a in answers]
        new = [label for label in tops if label not in classes]
        if new:  # a prototype's class has no output of the network to explain
            raise BadImage(
                f"explain=true: {new[0]!r} is a new class (prototypes), which Grad-CAM cannot explain"
            )
        images = images.to(self.device)
        with torch.no_grad():
            x = self.to_model_input(images)
        maps = self.explainer(x, [classes.index(label) for label in tops])
        out = []
        for image, heatmap, label in zip(images, maps, tops, strict=True):
            png = io.BytesIO()
            Image.fromarray(overlay(image, heatmap)).save(png, format="PNG")
            out.append(
                {
                    "method": "gradcam",
                    "column": column or "",
                    "label": label,
                    "overlay_png": base64.b64encode(png.getvalue()).decode("ascii"),
                }
            )
        return out

    def catalogue_item(self, i: int, score: float) -> dict:
        labels = self.index.labels
        label = labels[i] if labels is not None and len(labels) else None  # None: added without one
        label = None if label is None else self.index.class_names[label]
        path = public_name(self.index.items[i], self.catalogue_root)
        # the item's own id (items.csv's), which embed.py remove= takes: not its row, which removals shift
        return {"id": self.index.ids[i], "path": path, "label": label, "score": round(score, 6)}
