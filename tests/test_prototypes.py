"""New categories without retraining (issue #27, must show 2): a model trained without two classes names them
from 10 example images each, and keeps its trained classes' accuracy."""

import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.outputs import file_sha256
from skuvision.prototypes import FILE_NAME, load
from tests.helpers import compose_cfg, predict_csv, train_on_folder
from tests.writers import pattern_images

CLASSES = ("bag", "boot", "coat", "dress", "shirt")
KNOWN, NEW = CLASSES[:3], CLASSES[3:]
SIZE = 32


def write_class(folder: Path, label: int, n: int, seed: int) -> None:
    """n PNGs of class `label` of CLASSES (its bar position among all five)."""
    labels = np.full(n, label)
    images = pattern_images(np.append(labels, len(CLASSES) - 1), SIZE, 3, seed)[:n]  # five bands
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:03d}.png")


@pytest.fixture(scope="module")
def shop(tmp_path_factory) -> Path:
    """train/ (the three known classes), examples/ (10 images per new class), test/<class>/ (all five)."""
    root = tmp_path_factory.mktemp("fewshot")
    for label, name in enumerate(CLASSES):
        if name in KNOWN:
            write_class(root / "train" / name, label, 30, seed=label)
        else:
            write_class(root / "examples" / name, label, 10, seed=10 + label)
        write_class(root / "test" / name, label, 12, seed=20 + label)
    return root


@pytest.fixture(scope="module")
def checkpoint(shop, tmp_path_factory) -> Path:
    return train_on_folder(shop / "train", tmp_path_factory.mktemp("train") / "run", epochs=3, tta="none")


def accuracy(rows: list[dict], classes) -> float:
    truth = [Path(r["path"]).parent.name for r in rows]
    hits = [t == r["label_1"] for t, r in zip(truth, rows, strict=True) if t in classes]
    return sum(hits) / len(hits)


@pytest.fixture(scope="module")
def predicted(shop, checkpoint, tmp_path_factory):
    """predict.py on test/ without prototypes, then with them from examples/: rows, header, rows, run."""
    before = predict_csv(checkpoint, shop / "test", tmp_path_factory.mktemp("plain"))[1]
    run = tmp_path_factory.mktemp("protos")
    header, after = predict_csv(checkpoint, shop / "test", run, f"prototypes={shop / 'examples'}")
    return before, header, after, run / "run"


def test_new_classes_recognised_and_known_kept(predicted):
    before, header, after, _ = predicted
    assert {"label_1", "prob_1", "source_1"} <= set(header)
    new_acc, known_before, known_after = accuracy(after, NEW), accuracy(before, KNOWN), accuracy(after, KNOWN)
    print(f"new classes {new_acc:.3f} (chance 0.2); known {known_before:.3f} -> {known_after:.3f}")
    assert new_acc >= 0.8  # 5 classes: chance is 0.2
    assert known_after >= known_before - 0.02
    assert known_before >= 0.9  # the model learnt the known classes: the comparison means something
    for row in after:
        assert row["source_1"] == ("prototype" if row["label_1"] in NEW else "head")
        ranked = [row[f"label_{i}"] for i in range(1, 6)]
        assert set(ranked) == set(CLASSES)  # top-k ranks the new classes with the trained ones
        assert sum(float(row[f"prob_{i}"]) for i in range(1, 6)) == pytest.approx(1, abs=1e-4)


def test_saved_file_is_reused_and_plain(predicted, shop, checkpoint, tmp_path):
    before, _, after, run = predicted
    saved = run / FILE_NAME
    with zipfile.ZipFile(saved) as z, np.load(saved, allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)
        assert str(f["checkpoint_sha256"]) == file_sha256(checkpoint)
        assert list(f["class_names"]) == list(NEW) and list(f["counts"]) == [10, 10]
        assert len(z.namelist()) == len(f.files)
    again = predict_csv(checkpoint, shop / "test", tmp_path, f"prototypes={saved}")[1]
    assert [r["label_1"] for r in again] == [r["label_1"] for r in after]
    assert not (tmp_path / "run" / FILE_NAME).exists()  # a file is reused, not written again


def test_one_image_class_works(shop, checkpoint, tmp_path):
    one = tmp_path / "one"
    write_class(one / "dress", CLASSES.index("dress"), 1, seed=99)
    rows = predict_csv(checkpoint, shop / "test" / "dress", tmp_path, f"prototypes={one}")[1]
    assert {r["source_1"] for r in rows} <= {"head", "prototype"}
    assert sum(r["label_1"] == "dress" for r in rows) > len(rows) / 2


def refusal(checkpoint, shop, tmp_path, *extra) -> str:
    with pytest.raises(SkuvisionError) as raised:
        predict_csv(checkpoint, shop / "test" / "bag", tmp_path, *extra)
    message = str(raised.value)
    assert "\n" not in message
    return message


def test_refusals(shop, checkpoint, predicted, tmp_path):
    collide = tmp_path / "collide"
    write_class(collide / "coat", 2, 3, seed=5)
    assert "'coat' is a class the checkpoint was trained on" in refusal(
        checkpoint, shop, tmp_path / "a", f"prototypes={collide}"
    )
    empty = tmp_path / "empty"
    write_class(empty / "dress", 3, 2, seed=5)
    (empty / "scarf").mkdir()
    assert "'scarf' holds no image" in refusal(checkpoint, shop, tmp_path / "b", f"prototypes={empty}")
    loose = tmp_path / "loose"
    write_class(loose, 3, 1, seed=5)
    assert "outside a class folder" in refusal(checkpoint, shop, tmp_path / "c", f"prototypes={loose}")
    broken = tmp_path / "broken"
    write_class(broken / "dress", 3, 2, seed=5)
    (broken / "dress" / "bad.png").write_bytes(b"not a png")
    assert "bad.png cannot be read" in refusal(checkpoint, shop, tmp_path / "d", f"prototypes={broken}")
    assert "with calibration=" in refusal(
        checkpoint, shop, tmp_path / "e", f"prototypes={shop / 'examples'}", f"calibration={tmp_path}"
    )
    assert not (tmp_path / "a" / "run" / FILE_NAME).exists()


def test_file_of_another_checkpoint_or_forged_is_refused(predicted, checkpoint, tmp_path):
    saved = predicted[3] / FILE_NAME
    known = list(KNOWN)
    other = tmp_path / "other.ckpt"
    other.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(SkuvisionError, match="belong to another checkpoint"):
        load(saved, other, known)
    with np.load(saved, allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    forged = {
        "pickled": {**arrays, "class_names": np.array(["dress", "shirt"], dtype=object)},
        "renamed": {**arrays, "class_names": np.array(["dress", "coat"])},
        "twice": {**arrays, "class_names": np.array(["dress", "dress"])},
        "short": {**arrays, "vectors": arrays["vectors"][:, :3]},
        "nan": {**arrays, "mean": np.full_like(arrays["mean"], np.nan)},
        "missing": {k: v for k, v in arrays.items() if k != "mean"},
        "empty": {**arrays, "counts": np.array([0, 10])},
    }
    for name, content in forged.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **content)
        with pytest.raises(SkuvisionError) as raised:
            load(path, checkpoint, known)
        assert "\n" not in str(raised.value) and str(path) in str(raised.value), name
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 junk")
    with pytest.raises(SkuvisionError, match="cannot be read"):
        load(tmp_path / "junk.npz", checkpoint, known)


def test_server_ranks_new_classes_as_predict_does(predicted, checkpoint, shop, tmp_path):
    from skuvision.serving.demo import shown_label
    from skuvision.serving.predictor import Predictor
    from skuvision.tasks.serve import model_info, prepared

    _, _, after, run = predicted
    overrides = [f"ckpt_path={checkpoint}", f"prototypes={shop / 'examples'}", "serve.accelerator=cpu"]
    cfg = compose_cfg("serve", overrides, tmp_path / "serve")
    card, _, _ = prepared(cfg)  # a folder: built and saved in serve's run folder
    assert Path(card.prototypes) == (tmp_path / "serve" / FILE_NAME).resolve()
    assert model_info(card, None, cfg)["prototypes"]["classes"] == list(NEW)
    assert shown_label({"label": "dress", "prob": 0.9, "source": "prototype"}) == "dress (new class)"
    predictor = Predictor(card, None, top_k=5)
    rows = {Path(r["path"]).relative_to(shop / "test"): r for r in after}
    for name in ("dress/000.png", "coat/001.png"):
        image = predictor.decode((shop / "test" / name).read_bytes())
        answer = predictor.answer(image[None])[0]["labels"]
        row = rows[Path(name)]
        assert [a["label"] for a in answer] == [row[f"label_{i}"] for i in range(1, 6)]
        assert [a["source"] for a in answer] == [row[f"source_{i}"] for i in range(1, 6)]
        assert answer[0]["prob"] == pytest.approx(float(row["prob_1"]), abs=1e-4)
    other = tmp_path / "other.ckpt"
    other.write_bytes(checkpoint.read_bytes() + b"\0")
    wrong = compose_cfg("serve", [f"ckpt_path={other}", f"prototypes={run / FILE_NAME}"], tmp_path / "x")
    with pytest.raises(SkuvisionError, match="belong to another checkpoint"):
        prepared(wrong)
