"""Unknown products: a score per image, higher the less it looks like the training catalogue, and a flag at a
threshold chosen on the val split.

Scores (`METHODS`), all from one pass of the model:
- `knn`: the Euclidean distance of the image's L2-normalized pre-logit embedding to its k-th nearest neighbour
  among training embeddings (the reference: a seeded sample of the training split, stored in float16 with the
  checkpoint's SHA-256), searched exactly with FAISS;
- `energy`: -logsumexp of the logits (of the first label column, with several heads);
- `msp`: 1 - the top softmax probability.

eval.py scores the val split, takes as threshold the score below which `keep` of the val images lie (the
known images kept; 95 % by default) and writes unknown.json and the reference into its run folder; predict.py
and serve.py read them with `unknown=<that run folder>` and add `unknown_score` and `unknown` (score above the
threshold) to every answer. Given `unknown=<folder of other images>`, eval.py reports how well the score
separates them from the test split: AUROC and the FPR at 95 % TPR (the share of other images kept when 95 %
of known test images are).

Measured (bench/unknown.py --quick, 2026-12-06: simple_cnn on real Fashion-MNIST, 3,000 test images against
sklearn's 1,797 digits upscaled to 28 px), AUROC / FPR@95TPR: kNN (k = 1) 0.980 / 0.092, k = 10 0.963 / 0.217,
energy 0.872 / 0.740, max softmax probability 0.853 / 0.855; on the tests' generated clothes energy and msp
rank digits as more known than the test split (AUROC below 0.5) while kNN reaches 1.0. So kNN, k = 1, is the
default.
"""

from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
import torch
from torchmetrics.functional.classification import binary_auroc

from skuvision.errors import SkuvisionError
from skuvision.features import extract
from skuvision.outputs import file_sha256, new_file, unpacked_bytes, write_new_json

log = logging.getLogger("skuvision")

METHODS = ("knn", "energy", "msp")
UNKNOWN_FILE = "unknown.json"
REFERENCE_FILE = "unknown_reference.npz"
FPR_AT_TPR = 0.95  # the known share kept for the FPR figure (the OOD literature's FPR@95TPR)
MAX_JSON_BYTES = 1 << 20
# What unknown_reference.npz may unpack to: float16 embeddings of 262k images at 2,048 dims (resnet50), or
# 1M at 512. eval.py refuses to write a larger one; predict.py and serve.py refuse to read it.
MAX_REFERENCE_BYTES = 1 << 30
COLUMNS = ("unknown_score", "unknown")  # what predict.py's CSV gains


def label_logits(logits, heads) -> torch.Tensor:
    """The logits energy and msp read: the model's, or its first label column's."""
    if not isinstance(logits, dict):
        return logits
    return logits[next(h.column for h in heads if h.kind == "label")]


def check_method(method: str | None, key: str = "unknown_method") -> str | None:
    if method is not None and method not in METHODS:
        raise SkuvisionError(
            f"{key}={method}: use knn (distance to the training embeddings), energy or msp; null: none"
        )
    return method


@dataclass
class Reference:
    """Training embeddings (float16 on disk) of one checkpoint, searched exactly by inner product."""

    features: np.ndarray  # float32 (N, D), L2-normalized
    checkpoint_sha256: str

    def save(self, path: Path) -> Path:
        with new_file(path) as partial, open(partial, "wb") as f:
            np.savez(
                f,
                features=self.features.astype(np.float16),
                checkpoint_sha256=np.array(self.checkpoint_sha256),
            )
        return path

    @classmethod
    def load(cls, path: Path) -> Reference:
        try:
            unpacked = unpacked_bytes(path)
            if unpacked > MAX_REFERENCE_BYTES:
                raise SkuvisionError(
                    f"{path}: unpacks to {unpacked} bytes, more than the {MAX_REFERENCE_BYTES} an "
                    "unknown-product reference may hold; run eval.py again (unknown_reference= smaller)"
                )
            with np.load(path, allow_pickle=False) as data:
                features, sha = data["features"], str(data["checkpoint_sha256"])
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
            raise SkuvisionError(
                f"{path} is not an unknown-product reference eval.py wrote ({err})"
            ) from None
        if features.ndim != 2 or features.shape[0] == 0 or not np.isfinite(features).all():
            raise SkuvisionError(
                f"{path}: its features are not a finite (images, dims) array; run eval.py again"
            )
        return cls(features.astype(np.float32), sha)

    def distances(self, features: torch.Tensor, k: int) -> torch.Tensor:
        """The Euclidean distance of each (normalized) row to its k-th nearest reference embedding."""
        index = faiss.IndexFlatIP(self.features.shape[1])
        index.add(np.ascontiguousarray(self.features))
        similarity, _ = index.search(np.ascontiguousarray(features.numpy(), dtype=np.float32), k)
        cosine = torch.from_numpy(similarity[:, k - 1]).double()
        return (2 - 2 * cosine).clamp(min=0).sqrt()


def scores(method: str, logits: torch.Tensor, features: torch.Tensor, reference: Reference | None, k: int):
    """float64 unknown scores of a batch (higher: less like the training catalogue)."""
    if method == "knn":
        return reference.distances(features, k)
    logits = logits.double()
    if method == "energy":
        return -torch.logsumexp(logits, dim=1)
    return 1 - logits.softmax(dim=1).max(dim=1).values


def threshold_for(known: torch.Tensor, keep: float) -> float:
    """The lowest score at or below which at least `keep` of the known scores lie (those are kept)."""
    return float(np.quantile(known.numpy(), keep, method="inverted_cdf"))


def kept(scores_: torch.Tensor, threshold: float) -> float:
    return float((scores_ <= threshold).double().mean()) if len(scores_) else float("nan")


def separation(known: torch.Tensor, other: torch.Tensor) -> dict:
    """AUROC of telling `other` from `known` by the score (torchmetrics), and the FPR at 95 % TPR: the share
    of `other` kept at the threshold keeping 95 % of `known`."""
    preds = torch.cat([known, other]).double()
    target = torch.cat([torch.zeros(len(known)), torch.ones(len(other))]).long()
    return {
        "auroc": float(binary_auroc(preds, target)),
        "fpr_at_95_tpr": kept(other, threshold_for(known, FPR_AT_TPR)),
        "known_images": len(known),
        "other_images": len(other),
    }


def reference_indices(count: int, size: int | None, seed: int) -> np.ndarray:
    """A seeded sample of `size` of `count` training images (all with size None or >= count), in order."""
    if size is None or size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng(seed).choice(count, size, replace=False))


@dataclass
class Detector:
    """unknown.json and its reference, checked against the checkpoint they are used with."""

    method: str
    threshold: float
    keep: float
    k: int
    reference: Reference | None
    source: Path

    def scores(self, logits, features: torch.Tensor, heads) -> torch.Tensor:
        return scores(self.method, label_logits(logits, heads), features, self.reference, self.k)

    def describe(self) -> str:
        return (
            f"unknown_score: {self.method}, flagged above {self.threshold:.6f} (keeps {self.keep:.0%} of "
            f"known val images; {self.source})"
        )


def unknown_path(given: str | Path) -> Path:
    path = Path(given).expanduser()
    return path / UNKNOWN_FILE if path.is_dir() else path


def load_detector(given: str | Path, ckpt_path: str | Path, tta: str, key: str = "unknown") -> Detector:
    """The threshold eval.py chose and (for knn) its reference, refused in one line if either belongs to
    another checkpoint (or, for the logit scores, another TTA mode), or if the reference is not the one the
    threshold was chosen with. The reference is always unknown_reference.npz beside unknown.json: the file
    names no path."""
    path = unknown_path(given)
    if not path.is_file():
        raise SkuvisionError(
            f"{key}={given}: no {UNKNOWN_FILE} there; pass the run folder of an eval.py run of this "
            "checkpoint with a val split (calibrate=true, unknown_method set)"
        )
    if path.stat().st_size > MAX_JSON_BYTES:
        raise SkuvisionError(f"{key}={path}: larger than an {UNKNOWN_FILE} eval.py writes")
    try:
        saved = json.loads(path.read_text())
        method, threshold = check_method(saved["method"], f"{path}: method"), float(saved["threshold"])
        keep, k = float(saved["keep"]), int(saved["k"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise SkuvisionError(f"{key}={path} is not an {UNKNOWN_FILE} eval.py wrote ({err!r})") from None
    sha = file_sha256(ckpt_path)
    if saved.get("checkpoint_sha256") != sha:
        raise SkuvisionError(
            f"{key}={path} was chosen for checkpoint {saved.get('checkpoint')}, not ckpt_path={ckpt_path}: "
            f"run eval.py ckpt_path={ckpt_path} and pass its run folder"
        )
    if method != "knn" and saved.get("tta") != tta:
        raise SkuvisionError(
            f"{key}={path} was chosen with tta={saved.get('tta')}; use tta={saved.get('tta')} or run eval.py "
            f"tta={tta} and pass its run folder"
        )
    reference = None
    if method == "knn":
        reference_path = path.parent / REFERENCE_FILE
        if not reference_path.is_file():
            raise SkuvisionError(f"{key}={path}: {REFERENCE_FILE} is missing beside it (eval.py writes both)")
        if file_sha256(reference_path) != saved.get("reference", {}).get("sha256"):
            raise SkuvisionError(
                f"{reference_path} is not the reference {path} was chosen with (its SHA-256 differs): pass "
                "an eval.py run folder as it was written"
            )
        reference = Reference.load(reference_path)
        if reference.checkpoint_sha256 != sha:
            raise SkuvisionError(
                f"{reference_path} holds the embeddings of another checkpoint, not ckpt_path={ckpt_path}: "
                f"run eval.py ckpt_path={ckpt_path} and pass its run folder"
            )
        if not 1 <= k <= len(reference.features):
            raise SkuvisionError(f"{path}: k={k} but its reference holds {len(reference.features)} images")
    return Detector(method, threshold, keep, k, reference, path)


def unknown_options(cfg) -> dict | None:
    """eval.py's unknown_* keys, checked before any work; None with unknown_method=null."""
    method = check_method(cfg.get("unknown_method"))
    folder = cfg.get("unknown")
    if method is None:
        if folder:
            raise SkuvisionError(f"unknown={folder} needs a score: set unknown_method (knn, energy or msp)")
        return None
    keep = cfg.get("unknown_keep", 0.95)
    if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep < 1:
        raise SkuvisionError(
            f"unknown_keep={keep}: give the share of known images to keep, in (0, 1), e.g. 0.95"
        )
    k = cfg.get("unknown_k", 1)
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise SkuvisionError(f"unknown_k={k}: give the neighbour whose distance scores, 1 or more (e.g. 1)")
    size = cfg.get("unknown_reference", None)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < k):
        raise SkuvisionError(
            f"unknown_reference={size}: give how many training images to keep as the kNN reference "
            f"({k} or more, unknown_k), or null for all"
        )
    files = other_images(folder) if folder else None
    return {
        "method": method,
        "keep": float(keep),
        "k": k,
        "reference": size,
        "folder": folder,
        "images": files,
        "calibrate": bool(cfg.get("calibrate", True)),
    }


def other_images(folder) -> list[Path]:
    """The image files of eval.py's unknown= folder (searched recursively), refused if there are none."""
    from skuvision.data.inputs import collect_inputs

    path = Path(folder).expanduser()
    if not path.is_dir():
        raise SkuvisionError(
            f"unknown={folder}: not a folder; give a folder of images from outside the catalogue"
        )
    try:
        return collect_inputs(str(path))
    except SkuvisionError:
        raise SkuvisionError(
            f"unknown={folder}: no image files in it; give a folder of images from outside the catalogue"
        ) from None


def write_unknown(output_dir: Path, saved: dict, reference: Reference | None) -> list[Path]:
    """unknown.json (and the reference beside it, whose SHA-256 it records)."""
    written = []
    if reference is not None:
        path = reference.save(output_dir / REFERENCE_FILE)
        saved = {
            **saved,
            "reference": {
                "file": REFERENCE_FILE,
                "sha256": file_sha256(path),
                "images": len(reference.features),
                "dim": int(reference.features.shape[1]),
            },
        }
        written.append(path)
    write_new_json(output_dir / UNKNOWN_FILE, saved)
    return [output_dir / UNKNOWN_FILE, *written]


def with_unknown(
    header: list[str], rows: list[list], values: torch.Tensor, threshold: float, errors
) -> tuple:
    """predict.py's rows with unknown_score and unknown (true above the threshold; empty for unreadable rows),
    refused if the CSV has such a column already (a table column of that name)."""
    taken = [c for c in COLUMNS if c in header]
    if taken:
        raise SkuvisionError(f"unknown=: the predictions already have a column named {taken}; rename it")
    out = []
    for row, value, error in zip(rows, values.tolist(), errors, strict=True):
        cells = ["", ""] if error else [f"{value:.6f}", str(value > threshold).lower()]
        out.append([*row, *cells])
    return [*header, *COLUMNS], out


def reference_features(trainer, module, datamodule, size: int | None, seed: int) -> torch.Tensor:
    """Normalized embeddings of a seeded sample of the training split (eval transforms, no augmentation). A
    streamed split (litdata) has no random access: the whole stream is embedded, then sampled."""
    from torch.utils.data import IterableDataset, Subset

    from skuvision.data.datasets import InMemoryImages

    train = datamodule.splits["train"]
    streamed = isinstance(train, IterableDataset)
    if not streamed:
        keep = reference_indices(len(train), size, seed)
        sample = train.subset(keep) if isinstance(train, InMemoryImages) else Subset(train, keep.tolist())
        datamodule.splits["unknown_reference"] = sample
    datamodule.predict_split = "train" if streamed else "unknown_reference"
    try:
        features = extract(trainer, module, datamodule).features
    finally:
        datamodule.splits.pop("unknown_reference", None)
    return features[torch.from_numpy(reference_indices(len(features), size, seed))] if streamed else features


def eval_unknown(
    opts: dict, trainer, module, datamodule, test: tuple, output_dir: Path, header: dict, seed: int
):
    """eval.py's part: the score of the test split, the threshold chosen on val (unknown.json and the
    reference; none without a val split or with calibrate=false) and, with unknown=<folder>, AUROC and FPR at
    95 % TPR of that folder's images against the test split. `datamodule`: the checkpoint's own data (the
    catalogue), whose training split gives the reference and whose val split the threshold. Where it cannot
    (no training split for knn, data not readable) the part is skipped with a warning, or refused when
    unknown=<folder> asked for it. (report for metrics.json, files written)."""
    from skuvision.data.inputs import InputFilesDataModule

    method, k, keep, heads = opts["method"], opts["k"], opts["keep"], module.heads
    try:
        datamodule.setup("predict")
        why = None
        if method == "knn" and len(datamodule.splits.get("train", ())) == 0:
            why = "the checkpoint's data has no training split to take the kNN reference from"
    except SkuvisionError as err:
        why = f"the checkpoint's training data cannot be read ({err})"
    if why:
        if opts["images"]:
            raise SkuvisionError(f"unknown={opts['folder']}: {why}; or use unknown_method=energy")
        log.warning("unknown products skipped: %s", why)
        return {"method": method, "skipped": why}, []
    reference = None
    if method == "knn":
        features = reference_features(trainer, module, datamodule, opts["reference"], seed)
        if len(features) < k:
            raise SkuvisionError(f"unknown_k={k}: the training split has only {len(features)} images")
        stored, fits = features.numel() * 2, MAX_REFERENCE_BYTES // (2 * features.shape[1])  # float16
        if stored > MAX_REFERENCE_BYTES:  # refused before any file: never written for predict.py to refuse
            raise SkuvisionError(
                f"unknown_reference={opts['reference']}: {len(features)} embeddings take {stored} bytes, more"
                f" than a reference may hold ({MAX_REFERENCE_BYTES}); give unknown_reference={fits} or fewer"
            )
        reference = Reference(features.numpy(), header["checkpoint_sha256"])
    test_scores = scores(method, label_logits(test[0], heads), test[1], reference, k)
    report: dict = {
        "method": method,
        "k": k if method == "knn" else None,
        "keep": keep,
        "reference_images": len(reference.features) if reference is not None else None,
        "test_images": len(test_scores),
        "test_score_median": float(test_scores.median()) if len(test_scores) else None,
    }
    written: list[Path] = []
    val_set = datamodule.splits.get("val")
    threshold = None
    if not opts["calibrate"]:
        report["threshold_skipped"] = "calibrate=false: no threshold is chosen on val"
    elif val_set is None or len(val_set) == 0:
        report["threshold_skipped"] = "the data has no val split to choose the threshold on"
        log.warning("unknown products: %s; the scores are reported, no flag", report["threshold_skipped"])
    else:
        datamodule.predict_split = "val"
        val = extract(trainer, module, datamodule, logits=True)
        val_scores = scores(method, label_logits(val.logits, heads), val.features, reference, k)
        threshold = threshold_for(val_scores, keep)
        report |= {
            "threshold": threshold,
            "val_images": len(val_scores),
            "val_kept": kept(val_scores, threshold),
            "test_kept": kept(test_scores, threshold),
        }
        saved = {key: report[key] for key in ("method", "k", "keep", "threshold", "val_images", "val_kept")}
        saved["score"] = f"{method}: higher is less like the training catalogue; unknown above the threshold"
        written = write_unknown(output_dir, saved | header, reference)
    if opts["images"]:
        files = InputFilesDataModule(opts["images"], module.input_config, 64, 0)
        found = extract(trainer, module, files, logits=True)
        errors = found.per_image()
        readable = torch.tensor([not e for e in errors])
        if not readable.any():
            raise SkuvisionError(f"unknown={opts['folder']}: none of its {len(errors)} images could be read")
        other = scores(method, label_logits(found.logits, heads), found.features, reference, k)[readable]
        report["other"] = {
            "folder": str(opts["folder"]),
            "unreadable": int((~readable).sum()),
            **separation(test_scores, other),
        }
        if threshold is not None:
            report["other"]["flagged"] = 1 - kept(other, threshold)
    return report, written


def describe(report: dict) -> list[str]:
    """eval.py's lines about the unknown score."""
    lines = []
    if report.get("threshold") is not None:
        lines.append(
            f"unknown ({report['method']}): threshold {report['threshold']:.6f} keeps "
            f"{report['val_kept']:.1%} of {report['val_images']} val images, "
            f"{report['test_kept']:.1%} of test"
        )
    other = report.get("other")
    if other:
        lines.append(
            f"unknown ({report['method']}) vs {other['other_images']} images of {other['folder']}: AUROC "
            f"{other['auroc']:.4f}, FPR@95TPR {other['fpr_at_95_tpr']:.4f}"
            + (f", {other['flagged']:.1%} flagged" if "flagged" in other else "")
        )
    return lines
