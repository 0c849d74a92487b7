"""New categories without retraining: each new class is the centred, L2-normalised mean of its examples'
pre-logit features (SimpleShot), scored beside the trained head's classes, which keep their head.

Centring uses the mean feature of the checkpoint's training split, computed once when the prototypes are
built and stored with them, together with each trained class's own centred mean (its prototype) and the
SHA-256 of the checkpoint: a prototypes file of another checkpoint is refused.

How the two are combined (`combined_probs`): nearest-class-mean over the trained and the new prototypes,
as a softmax of `SCALE` x cosine, decides how much of an image's probability goes to the new classes; the
head shares the rest among the trained classes. Chosen by bench/fewshot.py (real Fashion-MNIST, simple_cnn
trained without Shirt and Bag, 5 shots, 10 draws): new / trained classes' accuracy 38.0 % / 91.0 % against the
head alone's 92.6 %; a hard nearest-mean gate 33.8 % / 91.5 %; one softmax over the head's logits and the
scaled cosines 80.7 % / 50.3 % (it takes the trained classes' images); scale 8 / 32: 39.2 / 36.2 % new.

The file is an .npz of plain arrays (no pickled objects; np.load with allow_pickle=False reads it).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from skuvision.data.decode import IMAGE_SUFFIXES
from skuvision.data.inputs import InputFilesDataModule, collect_inputs
from skuvision.errors import SkuvisionError
from skuvision.features import extract
from skuvision.outputs import file_sha256, new_file, unpacked_bytes

FILE_NAME = "prototypes.npz"
SCALE = 16.0  # softmax scale on cosines (bench/fewshot.py compares it); stored with the prototypes
MAX_FILE_BYTES = 256 * 1024 * 1024  # what a prototypes file may unpack to: vectors of a few thousand classes
KEYS = (
    "class_names",
    "vectors",
    "counts",
    "known_names",
    "known_vectors",
    "mean",
    "checkpoint_sha256",
    "scale",
)
SOURCE_HEAD, SOURCE_PROTOTYPE = "head", "prototype"


@dataclass
class Prototypes:
    """New classes' prototypes (M, D), the trained classes' (K, D), the centring mean (D,), as float32."""

    class_names: list[str]
    vectors: np.ndarray
    counts: list[int]
    known_names: list[str]
    known_vectors: np.ndarray
    mean: np.ndarray
    checkpoint_sha256: str
    scale: float = SCALE

    @property
    def names(self) -> list[str]:
        """Every class a combined prediction ranks: the trained ones first, then the new ones."""
        return [*self.known_names, *self.class_names]

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """(N, K + M) cosines of centred, normalised features to the trained then the new prototypes."""
        z = centred(features, self.mean)
        protos = torch.from_numpy(np.concatenate([self.known_vectors, self.vectors])).to(z)
        return z @ protos.T

    def combined_probs(self, head_probs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(N, K + M) probabilities over `names`: the new classes get their share of the nearest-class-mean
        softmax over all prototypes; the trained classes share the rest as the head's probabilities say."""
        ncm = (self.scale * self.cosines(features)).double().softmax(dim=1)
        new = ncm[:, len(self.known_names) :]
        rest = 1 - new.sum(dim=1, keepdim=True)
        return torch.cat([rest * head_probs.to(ncm), new], dim=1)

    def source(self, index: int) -> str:
        return SOURCE_PROTOTYPE if index >= len(self.known_names) else SOURCE_HEAD

    def save(self, path: Path) -> Path:
        """A new file (never replacing one): plain arrays only."""
        with new_file(path) as partial:
            np.savez(
                partial,
                class_names=np.array(self.class_names, dtype=str),
                vectors=self.vectors.astype(np.float32),
                counts=np.array(self.counts, dtype=np.int64),
                known_names=np.array(self.known_names, dtype=str),
                known_vectors=self.known_vectors.astype(np.float32),
                mean=self.mean.astype(np.float32),
                checkpoint_sha256=np.array(self.checkpoint_sha256),
                scale=np.array(self.scale, dtype=np.float64),
            )
        return Path(path)


def centred(features: torch.Tensor, mean: np.ndarray) -> torch.Tensor:
    """SimpleShot's CL2N: subtract the training mean, then L2-normalise."""
    features = features.float()
    return F.normalize(features - torch.from_numpy(mean).to(features), dim=1)


def class_means(features: torch.Tensor, labels: torch.Tensor, count: int, mean: np.ndarray) -> np.ndarray:
    """(count, D) centred, normalised mean of each class's centred, normalised features."""
    z = centred(features, mean)
    sums = torch.zeros(count, z.shape[1]).index_add_(0, labels.long(), z)
    return F.normalize(sums, dim=1).numpy().astype(np.float32)


def class_folders(folder: Path, known: list[str]) -> dict[str, list[Path]]:
    """{new class: its image files} from one subfolder per class, refused in one line when a class name is a
    trained class, a folder holds no image, or images lie outside a class folder."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SkuvisionError(f"prototypes={folder}: no such folder or prototypes file")
    loose = [p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    if loose:
        raise SkuvisionError(
            f"prototypes={folder}: {loose[0].name} lies outside a class folder; put each new class's images "
            "in a subfolder named by the class"
        )
    classes = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise SkuvisionError(
            f"prototypes={folder}: no class subfolders; give one subfolder per new class, holding its images"
        )
    taken = sorted({c.name for c in classes} & set(known))
    if taken:
        raise SkuvisionError(
            f"prototypes={folder}: {taken[0]!r} is a class the checkpoint was trained on; a new class needs "
            "a new name (rename the folder)"
        )
    files = {}
    for c in classes:
        try:
            files[c.name] = collect_inputs(str(c))
        except SkuvisionError:
            files[c.name] = []
        if not files[c.name]:
            raise SkuvisionError(
                f"prototypes={folder}: class folder {c.name!r} holds no image; give it at least 1 image, or "
                "remove it"
            )
    return files


def train_statistics(trainer, module, train_datamodule) -> tuple[np.ndarray, np.ndarray]:
    """(mean feature, per-class prototypes) of the checkpoint's training split."""
    train_datamodule.prepare_data()
    train_datamodule.setup("predict")
    train = extract(trainer, module, train_datamodule)
    features, labels = train.embeddings, train.per_image()
    if not len(features):
        raise SkuvisionError("prototypes: the checkpoint's training split holds no image to centre with")
    mean = features.mean(dim=0).numpy().astype(np.float32)
    known = class_means(features, torch.as_tensor(labels), len(module.class_names), mean)
    return mean, known


def build(
    folder: Path, ckpt_path: str | Path, trainer, module, train_datamodule, batch_size: int, workers: int
) -> Prototypes:
    """Prototypes of the new classes in `folder` for the checkpoint `module` was loaded from."""
    if module.multi_head is not None:
        raise SkuvisionError("prototypes= works with one-label models; this checkpoint has several heads")
    files = class_folders(folder, module.class_names)
    names = list(files)
    paths = [p for n in names for p in files[n]]
    labels = torch.tensor([i for i, n in enumerate(names) for _ in files[n]])
    inputs = InputFilesDataModule(paths, module.input_config, batch_size, workers)
    examples = extract(trainer, module, inputs)
    features, errors = examples.embeddings, examples.per_image()
    bad = next((i for i, e in enumerate(errors) if e), None)
    if bad is not None:
        raise SkuvisionError(
            f"prototypes: {paths[bad]} cannot be read ({errors[bad]}); remove or replace it (nothing built)"
        )
    mean, known = train_statistics(trainer, module, train_datamodule)
    return Prototypes(
        class_names=names,
        vectors=class_means(features, labels, len(names), mean),
        counts=[len(files[n]) for n in names],
        known_names=list(module.class_names),
        known_vectors=known,
        mean=mean,
        checkpoint_sha256=file_sha256(ckpt_path),
    )


def load(path: Path, ckpt_path: str | Path, known: list[str]) -> Prototypes:
    """A prototypes file, checked against the checkpoint (SHA-256, classes) and for shape and values."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise SkuvisionError(f"prototypes={path}: no such file or class folder")
    try:
        unpacked = unpacked_bytes(path)
        if unpacked > MAX_FILE_BYTES:
            raise SkuvisionError(
                f"prototypes={path}: unpacks to {unpacked} bytes, more than a prototypes file"
            )
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise SkuvisionError(
                    f"prototypes={path}: not a prototypes file (no {missing[0]}); build it with "
                    "predict.py prototypes=<folder of class folders>"
                )
            arrays = {k: f[k] for k in KEYS}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, MemoryError) as err:
        why = "holds pickled objects" if "pickle" in str(err) else f"cannot be read ({type(err).__name__})"
        raise SkuvisionError(f"prototypes={path}: {why}; build it again with predict.py") from None
    sha = str(arrays["checkpoint_sha256"])
    if sha != file_sha256(ckpt_path):
        raise SkuvisionError(
            f"prototypes={path} belong to another checkpoint (sha256 {sha[:12]}), not "
            f"{Path(ckpt_path).name}: "
            "build them again for this one with prototypes=<folder of class folders>"
        )
    protos = Prototypes(
        class_names=[str(n) for n in arrays["class_names"].reshape(-1)],
        vectors=arrays["vectors"],
        counts=[int(c) for c in arrays["counts"].reshape(-1)],
        known_names=[str(n) for n in arrays["known_names"].reshape(-1)],
        known_vectors=arrays["known_vectors"],
        mean=arrays["mean"],
        checkpoint_sha256=sha,
        scale=float(arrays["scale"]),
    )
    check(protos, path, known)
    return protos


def check(protos: Prototypes, path: Path, known: list[str]) -> None:
    """Shapes, types and values a file of this code has; its classes against the checkpoint's."""
    m, d = len(protos.class_names), protos.mean.shape[0] if protos.mean.ndim == 1 else -1
    shapes = {
        "vectors": (protos.vectors, (m, d)),
        "known_vectors": (protos.known_vectors, (len(protos.known_names), d)),
    }
    wrong = [
        k for k, (a, shape) in shapes.items() if a.dtype != np.float32 or a.shape != shape or not m or d < 1
    ]
    arrays = [protos.vectors, protos.known_vectors, protos.mean]
    if wrong or len(protos.counts) != m or not all(np.isfinite(a).all() for a in arrays):
        raise SkuvisionError(
            f"prototypes={path}: its arrays do not fit together; build it again with predict.py"
        )
    if not np.isfinite(protos.scale) or protos.scale <= 0:
        raise SkuvisionError(
            f"prototypes={path}: scale={protos.scale} is not a positive number; build it again"
        )
    if protos.known_names != list(known):
        raise SkuvisionError(
            f"prototypes={path}: its trained classes are not the checkpoint's; build it again"
        )
    taken = sorted(set(protos.class_names) & set(known))
    if taken or len(set(protos.class_names)) < m:
        name = taken[0] if taken else next(n for n in protos.class_names if protos.class_names.count(n) > 1)
        raise SkuvisionError(f"prototypes={path}: class {name!r} is named twice (or is a trained class)")
    if min(protos.counts) < 1:
        raise SkuvisionError(f"prototypes={path}: a class was built from 0 images; build it again")
