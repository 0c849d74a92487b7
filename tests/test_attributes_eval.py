"""eval.py on a model with several heads: per-column metrics, plots and predictions, per-head calibration,
per-tag thresholds chosen on val, and the calibration file predict and serve read."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import f1_score, precision_score

from skuvision import calibration
from skuvision.checkpoints import load_classifier
from skuvision.errors import SkuvisionError
from skuvision.tasks.evaluate import evaluate
from tests.helpers import compose_cfg, predict_csv
from tests.pages import read_page
from tests.writers import CATALOGUE_TYPES

torch.set_num_threads(2)

LABELS = ["articleType", "masterCategory", "baseColour"]


def f1_at(probs: np.ndarray, truth: np.ndarray, threshold: float) -> float:
    return f1_score(truth, probs >= threshold, zero_division=0)


def two_tags(n: int = 400, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Val probabilities and truth of two tags: "a" is right at about 0.3 (its positives score low), "b" at
    about 0.8 (its negatives score high)."""
    rng = np.random.default_rng(seed)
    truth = rng.random((n, 2)) < 0.4
    a = np.where(truth[:, 0], rng.normal(0.42, 0.07, n), rng.normal(0.18, 0.07, n))
    b = np.where(truth[:, 1], rng.normal(0.90, 0.04, n), rng.normal(0.68, 0.07, n))
    probs = np.clip(np.stack([a, b], axis=1), 0.001, 0.999)
    return torch.tensor(probs, dtype=torch.float64), torch.tensor(truth, dtype=torch.long)


def test_each_tag_gets_the_threshold_of_its_own_best_f1():
    probs, truth = two_tags()
    chosen = calibration.tag_thresholds(probs, truth, ["a", "b"], "f1", min_support=10)
    a, b = chosen["thresholds"]["a"], chosen["thresholds"]["b"]
    assert a == pytest.approx(0.3, abs=0.06) and b == pytest.approx(0.8, abs=0.06)
    assert chosen["fallback"] == [] and chosen["objective"] == "f1" and chosen["target"] is None
    grid = np.linspace(0.0, 1.0, 201)
    for j, name in enumerate(["a", "b"]):
        p, y = probs[:, j].numpy(), truth[:, j].numpy()
        at_chosen = f1_at(p, y, chosen["thresholds"][name])
        # The best F1 of any threshold (checked on a fine grid, with sklearn), and clearly better than 0.5.
        assert at_chosen >= max(f1_at(p, y, t) for t in grid) - 1e-12
        assert at_chosen > f1_at(p, y, 0.5) + 0.05
        assert chosen["val_f1"][name] == pytest.approx(at_chosen, abs=1e-6)
        assert chosen["val_f1_at_0.5"][name] == pytest.approx(f1_at(p, y, 0.5), abs=1e-6)


def test_by_precision_each_tag_gets_the_lowest_threshold_reaching_the_target():
    probs, truth = two_tags()
    target = 0.95
    chosen = calibration.tag_thresholds(probs, truth, ["a", "b"], "precision", target, min_support=10)
    assert chosen["target"] == target and chosen["unreached"] == []
    for j, name in enumerate(["a", "b"]):
        p, y = probs[:, j].numpy(), truth[:, j].numpy()
        threshold = chosen["thresholds"][name]
        assert precision_score(y, p >= threshold) >= target
        # Any lower threshold (the next lower val probability) misses the target.
        lower = p[p < threshold]
        assert precision_score(y, p >= lower.max()) < target
    assert chosen["thresholds"]["a"] < 0.5 < chosen["thresholds"]["b"]


def test_a_tag_with_too_few_val_positives_falls_back_to_the_pooled_threshold_and_is_listed():
    probs, truth = two_tags()
    rare = torch.zeros(len(truth), 1, dtype=torch.long)
    rare[:3] = 1  # three val images have it
    rare_probs = torch.full((len(truth), 1), 0.2, dtype=torch.float64)
    rare_probs[:3] = 0.95  # its own best threshold would be 0.95
    probs, truth = torch.cat([probs, rare_probs], dim=1), torch.cat([truth, rare], dim=1)
    chosen = calibration.tag_thresholds(probs, truth, ["a", "b", "rare"], "f1", min_support=10)
    assert chosen["fallback"] == ["rare"] and chosen["min_support"] == 10
    assert chosen["thresholds"]["rare"] == chosen["global_threshold"] != pytest.approx(0.95)
    pooled_p, pooled_y = probs.flatten().numpy(), truth.flatten().numpy()
    grid = np.linspace(0.0, 1.0, 201)
    best = max(f1_at(pooled_p, pooled_y, t) for t in grid)
    assert f1_at(pooled_p, pooled_y, chosen["global_threshold"]) >= best - 1e-12
    assert "fewer than 10 val positives" in " ".join(calibration.describe_tags(chosen))
    # With a lower minimum the rare tag gets its own.
    own = calibration.tag_thresholds(probs, truth, ["a", "b", "rare"], "f1", min_support=3)
    assert own["fallback"] == [] and own["thresholds"]["rare"] == pytest.approx(0.95)


# -- end to end: a small model with three label columns (one read off another) and a tag column


@pytest.fixture(scope="module")
def run(catalogue_run):
    return catalogue_run


@pytest.fixture(scope="module")
def checkpoint(run):
    return run / "checkpoints" / "last.ckpt"


def eval_overrides(checkpoint) -> list[str]:
    return [
        f"ckpt_path={checkpoint}",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "threads=2",
        "target_precision=0.9",
        "tag_min_support=3",
    ]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("eval") / "run"
    return evaluate(compose_cfg("eval", eval_overrides(checkpoint), out)), out


@pytest.fixture(scope="module")
def predictions(evaluation):
    _, out = evaluation
    with open(out / "predictions.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_per_column_metrics_agree_with_the_predictions_csv(evaluation, predictions):
    report, out = evaluation
    written = json.loads((out / "metrics.json").read_text())
    assert written["test/num_images"] == len(predictions)
    for column in LABELS:
        for metric in ("acc", "f1_macro", "f1_weighted", "loss", "num_images"):
            assert f"test/{column}/{metric}" in written, (column, metric)
        section = written["columns"][column]
        assert set(section["per_class"]) == {r[f"{column}_true"] for r in predictions} - {""}
        rows = [r for r in predictions if r[f"{column}_true"] != ""]
        # Rows without a value are left out of that column's figures, and only of that column's.
        assert (
            written[f"test/{column}/num_images"] == len(rows) == np.asarray(section["confusion_matrix"]).sum()
        )
        accuracy = np.mean([r[column] == r[f"{column}_true"] for r in rows])
        assert written[f"test/{column}/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert written["test/baseColour/num_images"] < len(predictions)
    assert "test/articleType/mistake_severity" in written  # masterCategory is read off articleType
    assert "test/baseColour/mistake_severity" not in written
    # Tags: at the thresholds chosen on val; their F1 is the one the predicted tags in the CSV give.
    names = ["floral", "sticker"]
    truth = np.array([[n in r["tags_true"].split(";") for n in names] for r in predictions])
    said = np.array([[n in r["tags"].split(";") for n in names] for r in predictions])
    assert written["test/tags/f1"] == pytest.approx(
        f1_score(truth, said, average="macro", zero_division=0), abs=1e-6
    )
    assert 0 < written["test/tags/map"] <= 1
    saved = json.loads((out / "calibration.json").read_text())
    for name in names:
        assert (
            written["columns"]["tags"]["per_tag"][name]["threshold"]
            == saved["heads"]["tags"]["thresholds"][name]
        )
        assert written["columns"]["tags"]["per_tag"][name]["support"] == int(
            truth[:, names.index(name)].sum()
        )
    assert written["columns"]["tags"]["thresholds_from"] == "chosen on val (tag_threshold=f1)"
    main = [written[f"test/{c}/acc"] for c in LABELS] + [written["test/tags/map"]]
    assert written["test/acc"] == pytest.approx(np.mean(main))
    assert report["test/acc"] == written["test/acc"]


def test_errors_page_shows_every_image_with_a_wrong_column_the_most_confident_mistake_first(
    evaluation, predictions
):
    _, out = evaluation

    def mistakes(row) -> list[float]:
        return [float(row[f"{c}_prob"]) for c in LABELS if row[f"{c}_true"] and row[c] != row[f"{c}_true"]]

    wrong = {row["path"]: row for row in predictions if mistakes(row)}  # none, where the model is right
    page = read_page(out / "errors.html")
    assert f"{len(wrong)} of {len(predictions)} test images" in "".join(page.text)
    assert sorted(t.name for t in page.tiles) == sorted(wrong)
    worst = [max(mistakes(wrong[t.name])) for t in page.tiles]
    assert all(a >= b - 1e-6 for a, b in zip(worst, worst[1:], strict=False))
    for tile in page.tiles:
        row = wrong[tile.name]
        cells = {head: (label, prob) for head, label, prob in tile.cells}
        for c in LABELS:
            assert cells[c] == (row[c], f"{float(row[f'{c}_prob']):.1%}")
            assert cells.get(f"{c} true", ("", ""))[0] == row[f"{c}_true"]
        assert len(tile.images) == 1


def test_the_coarse_prediction_is_always_the_parent_of_the_fine_one(predictions):
    for row in predictions:
        assert row["masterCategory"] == CATALOGUE_TYPES[row["articleType"]]
        # Its probability is the sum over its members, the fine prediction's among them.
        assert float(row["masterCategory_prob"]) >= float(row["articleType_prob"]) - 1e-6


def test_a_plot_per_column(evaluation):
    _, out = evaluation
    names = [f"confusion_matrix_{c}.png" for c in LABELS] + ["tags_tags.png"]
    names += [
        f"{plot}_{c}.png" for c in ("articleType", "baseColour") for plot in ("reliability", "coverage")
    ]
    for name in names:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200, name
    assert not (out / "reliability_masterCategory.png").exists()  # no temperature of its own


def test_calibration_json_has_every_head_and_loads_for_its_checkpoint_only(evaluation, checkpoint, run):
    report, out = evaluation
    saved = json.loads((out / "calibration.json").read_text())
    heads = saved["heads"]
    assert set(heads) == {*LABELS, "tags"}
    module = load_classifier(str(checkpoint))
    # Top level: the first label column's, as a one-label file has them.
    for key in calibration.SAVED_FIELDS:
        assert saved[key] == heads["articleType"][key], key
    assert saved["class_names"] == module.class_names == heads["articleType"]["classes"]
    assert (
        heads["masterCategory"]["temperature_of"] == "articleType"
        and "temperature" not in heads["masterCategory"]
    )
    assert heads["masterCategory"]["val_images"] == report["calibration"]["masterCategory"]["val_images"]
    assert heads["baseColour"]["temperature"] > 0
    tags = heads["tags"]
    assert set(tags["thresholds"]) == {"floral", "sticker"} and tags["objective"] == "f1"
    assert tags["min_support"] == 3 and tags["target"] is None
    assert set(tags["fallback"]) <= {"floral", "sticker"}
    loaded = calibration.load_calibration(out, checkpoint, module.tta, module.class_names, module.heads)
    temperatures, thresholds, tag_thresholds = calibration.calibration_for_heads(loaded)
    assert set(temperatures) == {"articleType", "baseColour"}
    assert set(thresholds) == set(LABELS)
    assert tag_thresholds == {"tags": tags["thresholds"]}
    other = next((run / "checkpoints").glob("best-*.ckpt"))
    with pytest.raises(SkuvisionError, match="was fitted for checkpoint") as refused:
        calibration.load_calibration(out, other, module.tta, module.class_names, module.heads)
    assert "\n" not in str(refused.value)
    with pytest.raises(SkuvisionError, match="not a one-label model"):
        calibration.load_calibration(out, checkpoint, module.tta, module.class_names)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda h: h.pop("baseColour"), "is for the heads"),
        (
            lambda h: h["baseColour"].update(classes=["Blue", "Red"]),
            "head 'baseColour': fitted for other classes",
        ),
        (
            lambda h: h["masterCategory"].update(temperature_of=None),
            "head 'masterCategory': not fitted as read off",
        ),
        (lambda h: h["tags"]["thresholds"].pop("floral"), "head 'tags': needs a threshold in \\[0, 1\\]"),
        (
            lambda h: h["tags"]["thresholds"].update(floral=1.5),
            "head 'tags': needs a threshold in \\[0, 1\\]",
        ),
    ],
)
def test_a_heads_section_that_does_not_match_the_model_is_refused_in_one_line(
    evaluation, checkpoint, tmp_path, edit, message
):
    _, out = evaluation
    saved = json.loads((out / "calibration.json").read_text())
    edit(saved["heads"])
    changed = tmp_path / "calibration.json"
    changed.write_text(json.dumps(saved))
    module = load_classifier(str(checkpoint))
    with pytest.raises(SkuvisionError, match=message) as refused:
        calibration.load_calibration(changed, checkpoint, module.tta, module.class_names, module.heads)
    assert "\n" not in str(refused.value)


def test_an_earlier_per_column_plot_is_never_replaced(checkpoint, evaluation, tmp_path):
    _, out = evaluation
    again = tmp_path / "again"
    again.mkdir()
    shutil.copy(out / "tags_tags.png", again / "tags_tags.png")
    before = (again / "tags_tags.png").read_bytes()
    with pytest.raises(SkuvisionError, match="tags_tags.png exists"):
        evaluate(compose_cfg("eval", eval_overrides(checkpoint), again))
    assert sorted(p.name for p in again.iterdir()) == ["tags_tags.png"]
    assert (again / "tags_tags.png").read_bytes() == before


def test_predict_with_evals_calibration_answers_as_eval_did(evaluation, predictions, checkpoint, tmp_path):
    """The same test images through predict.py with calibration=<the eval run>: every label column's top-1 and
    calibrated probability, and the tags at the per-tag thresholds chosen on val, are eval's."""
    _, out = evaluation
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for row in predictions:
        shutil.copy(row["path"], inputs / Path(row["path"]).name)
    _, rows = predict_csv(checkpoint, inputs, tmp_path / "predict", f"calibration={out}")
    predicted = {Path(r["path"]).name: r for r in rows}
    for row in predictions:
        mine = predicted[Path(row["path"]).name]
        for column in LABELS:
            assert mine[column] == row[column], column
            assert float(mine[f"{column}_prob"]) == pytest.approx(float(row[f"{column}_prob"]), abs=1e-5)
        assert set(mine["tags"].split(";")) == set(row["tags"].split(";"))


def test_embed_of_a_multi_head_model_indexes_the_first_label_column(checkpoint, predictions, tmp_path):
    from skuvision.tasks.embed import embed

    out = tmp_path / "embed"
    overrides = [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "num_workers=0", "threads=2"]
    result = embed(compose_cfg("embed", overrides, out))
    saved = np.load(out / "embeddings.npz")
    classes = load_classifier(checkpoint).heads[0].classes
    by_path = {r["path"]: r[f"{LABELS[0]}_true"] for r in predictions}
    assert [classes[i] for i in saved["labels"]] == [by_path[str(item)] for item in saved["items"]]
    assert result["retrieval"]["recall@1"] > 0.5
