"""Unknown products (skuvision.unknown): eval.py chooses the threshold on val and measures the score against
another data set; predict.py and the server's Predictor flag the images; refusals of mismatched files."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from skuvision import unknown
from skuvision.errors import SkuvisionError
from skuvision.serving.predictor import Predictor, model_card
from skuvision.tasks.evaluate import evaluate
from tests.helpers import compose_cfg, predict_csv, quick_overrides, trained_checkpoint
from tests.writers import balanced_labels, pattern_images


def write_digits(folder, count: int = 120):
    """Images of another data set: sklearn's 8 x 8 digits, upscaled to 28 px grey PNGs."""
    from sklearn.datasets import load_digits

    folder.mkdir(parents=True)
    for i, image in enumerate(load_digits().images[:count]):
        pixels = np.clip(image * 16, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((28, 28), Image.Resampling.BILINEAR).save(
            folder / f"digit_{i:03d}.png"
        )
    return folder


def write_clothes(folder, count: int = 20):
    """Known images drawn like the Fashion-MNIST-like training set (tests/writers.py), as files."""
    folder.mkdir(parents=True)
    for i, image in enumerate(pattern_images(balanced_labels(count, 10, 7), 28, 1, seed=7)[..., 0]):
        Image.fromarray(image).save(folder / f"clothes_{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root):
    overrides = quick_overrides("fashion_mnist", data_root) + [
        "trainer.max_epochs=1",
        "trainer.precision=32",
        "data.val_fraction=0.25",  # 100 val images: enough to place a 95 % threshold
        "tta=none",
    ]
    return trained_checkpoint(tmp_path_factory.mktemp("unknown_train") / "run", overrides)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    return write_digits(tmp_path_factory.mktemp("digits") / "digits")


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, checkpoint, digits):
    out = tmp_path_factory.mktemp("unknown_eval") / "run"
    overrides = [
        f"ckpt_path={checkpoint}",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "threads=2",
        "gallery=false",
        f"unknown={digits}",
    ]
    return evaluate(compose_cfg("eval", overrides, out)), out


def test_digits_score_higher_than_the_clothes_test_split(evaluation, digits):
    report, out = evaluation
    written = json.loads((out / "metrics.json").read_text())["unknown"]
    other = written["other"]
    print(f"kNN unknown score, test vs digits: AUROC {other['auroc']:.4f}, FPR@95 {other['fpr_at_95_tpr']}")
    assert written["method"] == "knn" and other["other_images"] == 120 and other["known_images"] == 100
    # kNN measured AUROC 1.0, FPR@95 0.0 with seeds 42, 1, 2 (energy 0.20-0.42, msp 0.17-0.45 on the same
    # checkpoints: confident on digits); random scores give 0.5.
    assert other["auroc"] > 0.9 and other["fpr_at_95_tpr"] < 0.3
    assert other["flagged"] > 0.7  # digits flagged at the threshold chosen on val
    saved = json.loads((out / unknown.UNKNOWN_FILE).read_text())
    assert saved["threshold"] == written["threshold"] and saved["keep"] == 0.95
    # The threshold keeps at least the stated share of known val images, and about that share of test.
    assert written["val_kept"] >= 0.95 and written["test_kept"] >= 0.8


def test_predict_and_the_server_flag_the_digits_alike(evaluation, checkpoint, digits, tmp_path):
    _, out = evaluation
    known = write_clothes(tmp_path / "clothes")
    inputs = tmp_path / "inputs.txt"
    files = sorted(known.iterdir()) + sorted(digits.iterdir())[:20]
    inputs.write_text("\n".join(str(p) for p in files))
    header, rows = predict_csv(checkpoint, inputs, tmp_path, f"unknown={out}")
    assert header[-2:] == ["unknown_score", "unknown"]
    by_kind = {kind: [r for r in rows if f"/{kind}/" in r["path"]] for kind in ("clothes", "digits")}
    flagged = {k: sum(r["unknown"] == "true" for r in v) for k, v in by_kind.items()}
    score = {k: np.mean([float(r["unknown_score"]) for r in v]) for k, v in by_kind.items()}
    assert score["digits"] > score["clothes"] and flagged["digits"] >= 16 and flagged["clothes"] <= 4
    threshold = json.loads((out / unknown.UNKNOWN_FILE).read_text())["threshold"]
    assert all((float(r["unknown_score"]) > threshold) == (r["unknown"] == "true") for r in rows)
    # The server's Predictor answers the same scores for the same bytes.
    detector = unknown.load_detector(out, checkpoint, "none")
    predictor = Predictor(model_card(str(checkpoint)), unknown=detector)
    images = torch.stack([predictor.decode(p.read_bytes()) for p in files[:3] + files[-3:]])
    answers = predictor.answer(images)
    expected = rows[:3] + rows[-3:]
    for answer, row in zip(answers, expected, strict=True):
        assert answer["unknown_score"] == pytest.approx(float(row["unknown_score"]), abs=1e-4)
        assert answer["unknown"] == (row["unknown"] == "true")


def test_a_reference_or_threshold_of_another_checkpoint_is_refused(evaluation, checkpoint, tmp_path):
    _, out = evaluation
    other_ckpt = tmp_path / "other.ckpt"
    other_ckpt.write_bytes(b"another checkpoint")
    with pytest.raises(SkuvisionError, match="was chosen for checkpoint .* not ckpt_path="):
        unknown.load_detector(out, other_ckpt, "none")
    # The reference of another checkpoint, with unknown.json edited to name it: refused by what it holds.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    reference = unknown.Reference.load(copy / unknown.REFERENCE_FILE)
    (copy / unknown.REFERENCE_FILE).unlink()
    unknown.Reference(reference.features, "0" * 64).save(copy / unknown.REFERENCE_FILE)
    saved = json.loads((copy / unknown.UNKNOWN_FILE).read_text())
    saved["reference"]["sha256"] = unknown.file_sha256(copy / unknown.REFERENCE_FILE)
    (copy / unknown.UNKNOWN_FILE).write_text(json.dumps(saved))
    with pytest.raises(SkuvisionError, match="holds the embeddings of another checkpoint"):
        unknown.load_detector(copy, checkpoint, "none")
    # A reference swapped in without its unknown.json: not the one the threshold was chosen with.
    shutil.copy(out / unknown.UNKNOWN_FILE, copy / unknown.UNKNOWN_FILE)
    with pytest.raises(SkuvisionError, match="is not the reference .* was chosen with"):
        unknown.load_detector(copy, checkpoint, "none")
    (copy / unknown.REFERENCE_FILE).unlink()
    with pytest.raises(SkuvisionError, match="unknown_reference.npz is missing beside it"):
        unknown.load_detector(copy, checkpoint, "none")
    (copy / unknown.UNKNOWN_FILE).write_text("[")
    with pytest.raises(SkuvisionError, match="is not an unknown.json eval.py wrote"):
        unknown.load_detector(copy, checkpoint, "none")
    with pytest.raises(SkuvisionError, match="no unknown.json there"):
        unknown.load_detector(tmp_path, checkpoint, "none")


def test_serve_refuses_a_threshold_of_another_checkpoint_before_it_binds(evaluation, checkpoint, tmp_path):
    from skuvision.tasks.serve import model_info, unknown_detector

    _, out = evaluation
    card = model_card(str(checkpoint))
    cfg = compose_cfg("serve", [f"ckpt_path={checkpoint}", f"unknown={out}"], tmp_path / "serve")
    detector = unknown_detector(cfg, card)
    assert model_info(card, None, cfg, detector)["unknown"]["threshold"] == detector.threshold
    forged = tmp_path / "forged"
    shutil.copytree(out, forged)
    saved = json.loads((forged / unknown.UNKNOWN_FILE).read_text())
    saved["checkpoint_sha256"] = "0" * 64
    (forged / unknown.UNKNOWN_FILE).write_text(json.dumps(saved))
    cfg.unknown = str(forged)
    with pytest.raises(SkuvisionError, match="was chosen for checkpoint .* not ckpt_path=") as err:
        unknown_detector(cfg, card)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("unknown={empty}", "no image files in it"),
        ("unknown={empty}/missing", "not a folder"),
        ("unknown_method=mahalanobis", "use knn .*, energy or msp"),
        ("unknown_keep=1.0", r"unknown_keep=1.0: give the share of known images to keep, in \(0, 1\)"),
        ("unknown_k=0", "unknown_k=0: give the neighbour"),
    ],
)
def test_eval_refuses_bad_unknown_keys_before_any_work(tmp_path, override, message):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    overrides = ["ckpt_path=/nonexistent/any.ckpt", override.format(empty=empty)]
    cfg = compose_cfg("eval", overrides, tmp_path / "run")
    with pytest.raises(SkuvisionError, match=message) as err:
        unknown.unknown_options(cfg)
    assert "\n" not in str(err.value)


def test_separation_and_threshold_match_their_definitions():
    generator = torch.Generator().manual_seed(0)
    known, other = torch.randn(200, generator=generator), torch.randn(150, generator=generator) + 1.5
    result = unknown.separation(known.double(), other.double())
    pairs = (other[:, None] > known[None, :]).double().mean()  # AUROC: P(other scores above known)
    assert result["auroc"] == pytest.approx(float(pairs), abs=1e-6)
    threshold = unknown.threshold_for(known.double(), 0.95)
    assert (known <= threshold).double().mean() >= 0.95 > (known < threshold).double().mean()
    assert result["fpr_at_95_tpr"] == pytest.approx(float((other <= threshold).double().mean()))


@pytest.mark.parametrize("planted", ["pickled", "text", "not finite", "no features"])
def test_a_planted_reference_file_is_refused_in_one_line_and_runs_nothing(tmp_path, planted):
    path = tmp_path / unknown.REFERENCE_FILE
    sha = np.array("0" * 64)
    if planted == "pickled":  # an object array: loading it would unpickle
        np.savez(path, features=np.array([{"x": 1}], dtype=object), checkpoint_sha256=sha)
    elif planted == "text":
        path.write_text("not an npz")
    elif planted == "not finite":
        np.savez(path, features=np.full((3, 4), np.nan, dtype=np.float16), checkpoint_sha256=sha)
    else:
        np.savez(path, checkpoint_sha256=sha)
    with pytest.raises(SkuvisionError, match=r"unknown_reference\.npz") as refused:
        unknown.Reference.load(path)
    assert "\n" not in str(refused.value)


def test_an_oversized_reference_is_refused_in_one_line(evaluation, checkpoint, monkeypatch):
    _, out = evaluation
    path = out / unknown.REFERENCE_FILE
    assert unknown.load_detector(out, checkpoint, "none").reference is not None  # loads under the cap
    monkeypatch.setattr(unknown, "MAX_REFERENCE_BYTES", path.stat().st_size // 2)
    with pytest.raises(SkuvisionError, match=r"unknown_reference\.npz: unpacks to \d+ bytes") as refused:
        unknown.load_detector(out, checkpoint, "none")
    assert "\n" not in str(refused.value)


def test_eval_refuses_a_reference_over_the_cap_or_a_taken_name_before_writing(
    checkpoint, tmp_path, monkeypatch
):
    overrides = [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "trainer.precision=32", "threads=2"]
    # An unknown.json of an earlier run: refused in the one check of every name, before any work.
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / unknown.UNKNOWN_FILE).write_text("{}")
    with pytest.raises(SkuvisionError, match=r"unknown\.json exists") as refused:
        evaluate(compose_cfg("eval", overrides, taken))
    assert "\n" not in str(refused.value)
    assert [p.name for p in taken.iterdir()] == [unknown.UNKNOWN_FILE]
    # A reference larger than predict.py would read: refused, with the size that fits, and nothing written.
    monkeypatch.setattr(unknown, "MAX_REFERENCE_BYTES", 4096)
    out = tmp_path / "run"
    with pytest.raises(
        SkuvisionError, match=r"unknown_reference=\d+: \d+ embeddings .* give unknown_reference=\d+ "
    ) as refused:
        evaluate(compose_cfg("eval", overrides, out))
    assert "\n" not in str(refused.value)
    assert not [p for p in out.rglob("*") if p.is_file()]  # (the CSV logger's empty folder aside)
