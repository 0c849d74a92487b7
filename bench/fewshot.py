"""make bench rows for new categories without retraining (skuvision.prototypes): a simple_cnn trained on real
Fashion-MNIST without two of its classes (Shirt, the hardest class, and Bag) names them from 1, 5 and 20
example images each, beside references measured on the same features in the same run:

- nearest class mean without centring (plain L2-normalised means): SimpleShot's ablation;
- the trained classes' accuracy with the head alone (before prototypes);
- the combination rules considered (how the new classes' cosines and the head's probabilities make one
  prediction): skuvision's (the nearest-class-mean softmax over all prototypes gives the new classes their
  share, the head shares the rest), a hard gate (the nearest prototype decides new vs trained, then the head),
  and one softmax over the head's logits and the scaled cosines.

Support images are drawn (several draws, seeded) from the held-out classes' training images, which the model
never saw; accuracy is measured on the test split, all 10 classes. --quick: generated images (bars at a
class's position), fewer draws.

Alone: python -m bench.fewshot [--quick]
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench import THREADS
from bench.table import run_section
from skuvision.assembly import build_trainer, data_module, from_checkpoint
from skuvision.config import compose_config
from skuvision.data.fashion_mnist import CLASS_NAMES, DEBIAN_DIR, read_idx
from skuvision.data.inputs import InputFilesDataModule
from skuvision.features import extract
from skuvision.prototypes import SCALE, Prototypes, class_means

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ("Shirt", "Bag")
SHOTS = (1, 5, 20)
OTHER_SCALES = (4.0, 8.0, 32.0)  # skuvision's rule at other softmax scales than SCALE


def fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST (the Debian package, or data/fashion_mnist/): uint8 (N, 28, 28) images, labels."""
    prefix = "train" if split == "train" else "t10k"
    for folder in (ROOT / "data" / "fashion_mnist", Path(DEBIAN_DIR)):
        images = folder / f"{prefix}-images-idx3-ubyte.gz"
        if images.is_file():
            return read_idx(images), read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
    raise SystemExit("bench.fewshot: real Fashion-MNIST not found; run `make data` first")


def generated(n_per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Ten classes of 28 px images: a bright bar at the class's row band, on noise."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(10), n_per_class)
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 7, :] = 230
    return images, labels


def write_pngs(folder: Path, images: np.ndarray, labels: np.ndarray, names: list[str]) -> list[Path]:
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        path = folder / names[label] / f"{i:05d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(path)
    return paths


def per_class(labels: np.ndarray, classes, count: int, rng) -> np.ndarray:
    return np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:count] for c in classes])


def trained_without(workdir: Path, images, labels, names: list[str], epochs: int) -> Path:
    from skuvision.tasks.train import train

    write_pngs(workdir / "train", images, labels, names)
    overrides = [
        "data=image_folder",
        f"data.root={workdir / 'train'}",
        "model=simple_cnn",
        "input.image_size=28",
        "data.num_workers=2",
        f"trainer.max_epochs={epochs}",
        "optimizer.lr=0.01",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "callbacks.progress_bar=null",
        "tta=none",
        f"threads={THREADS}",
    ]
    run = workdir / "run"
    train(compose_config("train", overrides, run))
    return Path(json.loads((run / "metrics.json").read_text())["checkpoint"])


def file_features(trainer, module, paths: list[Path]) -> torch.Tensor:
    found = extract(trainer, module, InputFilesDataModule(paths, module.input_config, 256, 2))
    assert not any(found.per_image()), found.per_image()
    return found.embeddings


def rules(protos: Prototypes, head_logits: torch.Tensor, features: torch.Tensor) -> dict[str, torch.Tensor]:
    """Top-1 (index into protos.names) of each combination rule considered."""
    k = len(protos.known_names)
    head = head_logits.double().softmax(dim=1)
    cos = protos.cosines(features)
    gate = cos.argmax(dim=1)
    return {
        "skuvision": protos.combined_probs(head, features).argmax(dim=1),
        "gate": torch.where(gate >= k, gate, head.argmax(dim=1)),
        "one softmax": torch.cat([head_logits, protos.scale * cos[:, k:]], dim=1).argmax(dim=1),
        **{
            f"scale {s:g}": replace(protos, scale=s).combined_probs(head, features).argmax(dim=1)
            for s in OTHER_SCALES
        },
    }


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    torch.manual_seed(0)
    names = [n.replace("/", "-") for n in CLASS_NAMES]  # a folder name each ("T-shirt/top" would nest)
    new = [names.index(c) for c in HELD_OUT]
    known = [c for c in range(10) if c not in new]
    if quick:
        train_x, train_y = generated(60, seed=0)
        test_x, test_y = generated(30, seed=1)
        draws, epochs, test_per_class = 3, 4, 30
    else:
        train_x, train_y = fashion("train")
        test_x, test_y = fashion("test")
        draws, epochs, test_per_class = 10, 2, 500
    rng = np.random.default_rng(0)
    seen = per_class(train_y, known, 60 if quick else 1000, rng)
    pool = per_class(train_y, new, 50 if quick else 500, rng)  # support images, never trained on
    test = per_class(test_y, range(10), test_per_class, rng)
    ckpt = trained_without(workdir, train_x[seen], train_y[seen], names, epochs)
    module, _ = from_checkpoint(ckpt)
    trainer = build_trainer(
        compose_config(
            "predict",
            [f"ckpt_path={ckpt}", "input=x", "trainer.accelerator=cpu", "trainer.precision=32"],
            workdir / "p",
        ),
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    known_names = module.class_names  # the trained folder's classes, sorted by name
    train_split = data_module(module.hparams.data, module.input_config, "train")
    train_split.prepare_data()
    train_split.setup("predict")
    train = extract(trainer, module, train_split)
    train_features, train_labels = train.embeddings, train.per_image()
    mean = train_features.mean(dim=0).numpy()  # as skuvision.prototypes.train_statistics
    train_labels = torch.as_tensor(train_labels)
    known_vectors = class_means(train_features, train_labels, len(known_names), mean)
    plain_known = class_means(train_features, train_labels, len(known_names), np.zeros_like(mean))
    pool_paths = write_pngs(workdir / "pool", train_x[pool], train_y[pool], names)
    pool_features = file_features(trainer, module, pool_paths)
    test_paths = write_pngs(workdir / "test", test_x[test], test_y[test], names)
    test_features = file_features(trainer, module, test_paths)
    head_logits = module.backbone.get_classifier()(test_features)  # eval mode: the head of these features
    truth = [names[c] for c in test_y[test]]
    is_new = torch.tensor([t in HELD_OUT for t in truth])
    head_top = [known_names[i] for i in head_logits.argmax(dim=1).tolist()]
    before = np.mean([h == t for h, t in zip(head_top, truth, strict=True) if t not in HELD_OUT])

    results: dict[int, dict[str, list]] = {}
    for shots in SHOTS:
        results[shots] = {}
        for draw in range(draws):
            picked = per_class(train_y[pool], new, shots, np.random.default_rng(100 * shots + draw))
            support, labels = pool_features[picked], torch.tensor(train_y[pool][picked])
            order = torch.tensor([new.index(int(c)) for c in labels])
            protos = Prototypes(
                list(HELD_OUT), class_means(support, order, 2, mean), [shots] * 2, known_names, known_vectors,
                mean, "bench",
            )  # fmt: skip
            all_names = protos.names
            for rule, top in rules(protos, head_logits, test_features).items():
                hit = torch.tensor([all_names[i] == t for i, t in zip(top.tolist(), truth, strict=True)])
                results[shots].setdefault(f"{rule} new", []).append(hit[is_new].float().mean().item())
                results[shots].setdefault(f"{rule} known", []).append(hit[~is_new].float().mean().item())
            zero = np.zeros_like(mean)
            plain = Prototypes(
                list(HELD_OUT), class_means(support, order, 2, zero), [shots] * 2, known_names, plain_known,
                zero, "bench",
            )  # fmt: skip
            nearest = plain.cosines(test_features).argmax(dim=1)
            hit = torch.tensor([plain.names[i] == t for i, t in zip(nearest.tolist(), truth, strict=True)])
            results[shots].setdefault("uncentred new", []).append(hit[is_new].float().mean().item())
    return table(results, before, draws, quick, ckpt)


def mean_sd(values: list[float]) -> str:
    return f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f} %"


def table(results: dict, before: float, draws: int, quick: bool, ckpt: Path) -> tuple[list[tuple], list[str]]:
    rows = []
    for shots, r in results.items():
        rows.append(
            (
                f"new classes ({', '.join(HELD_OUT)}), {shots}-shot: test accuracy (10-way)",
                mean_sd(r["skuvision new"]),
                f"{mean_sd(r['uncentred new'])} (nearest mean, no centring)",
                f"{np.mean(r['skuvision new']) / max(np.mean(r['uncentred new']), 1e-9):.2f}x",
                "well above chance (10 %)",
            )
        )
        rows.append(
            (
                f"trained classes, {shots}-shot prototypes beside the head: test accuracy",
                mean_sd(r["skuvision known"]),
                f"{100 * before:.1f} % (head alone)",
                f"{100 * (np.mean(r['skuvision known']) - before):+.1f} points",
                "within 2 points",
            )
        )
    for rule in ("gate", "one softmax", *(f"scale {s:g}" for s in OTHER_SCALES)):
        for shots in (5,):
            r = results[shots]
            rows.append(
                (
                    f"rule '{rule}', {shots}-shot: new / trained classes' accuracy",
                    f"{mean_sd(r[f'{rule} new'])} / {mean_sd(r[f'{rule} known'])}",
                    f"{mean_sd(r['skuvision new'])} / {mean_sd(r['skuvision known'])} (skuvision's rule)",
                    "",
                    "trained within 2 points of the head alone",
                )
            )
    data = "generated bars (--quick)" if quick else "real Fashion-MNIST"
    notes = [
        f"Few-shot: simple_cnn trained on {data} without {' and '.join(HELD_OUT)}; "
        f"{draws} draws of support images per shot count, softmax scale {SCALE:g} on cosines."
    ]
    return rows, notes


if __name__ == "__main__":
    run_section(bench_rows, __doc__.splitlines()[0], "generated images, fewer draws")
