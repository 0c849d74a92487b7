"""Confidence for auto-tagging: temperature scaling, the accuracy threshold, eval.py's report and plots, and
predict.py's review column."""

import csv
import json
import math
import re

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from skuvision import calibration
from skuvision.checkpoints import load_classifier
from skuvision.errors import SkuvisionError
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.predict import predict
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides
from tests.pages import read_page
from tests.writers import write_image_folder

CLASSES = ("kettle", "phone", "shirt", "toaster", "watch")


def sampled(n: int = 4000, k: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model (T = 1)."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, k, generator=generator, dtype=torch.float64) * 2
    labels = torch.multinomial(logits.softmax(1), 1, generator=generator).flatten()
    return logits, labels


def test_temperature_minimizes_nll_like_a_grid_search():
    logits, labels = sampled(n=2000)
    logits = logits * 2.5  # over-confident by 2.5
    fitted = calibration.fit_temperature(logits, labels)
    # Brute force: a coarse grid over [0.2, 20], then a fine one around its best point.
    coarse = torch.exp(torch.linspace(math.log(0.2), math.log(20), 101, dtype=torch.float64))
    best = coarse[torch.tensor([calibration.nll(logits, labels, t.item()) for t in coarse]).argmin()]
    fine = best * torch.exp(torch.linspace(-0.05, 0.05, 101, dtype=torch.float64))
    nlls = torch.tensor([calibration.nll(logits, labels, t.item()) for t in fine], dtype=torch.float64)
    assert fitted == pytest.approx(fine[nlls.argmin()].item(), rel=1e-3)
    assert calibration.nll(logits, labels, fitted) <= nlls.min().item() + 1e-9
    assert calibration.nll(logits, labels, fitted) < calibration.nll(logits, labels)


def test_overconfident_model_gets_a_temperature_above_one_and_a_lower_ece():
    logits, labels = sampled(seed=1)
    calibrated_t = calibration.fit_temperature(logits, labels)
    assert calibrated_t == pytest.approx(1.0, abs=0.1)  # already calibrated: nothing to fix
    overconfident = logits * 5
    t = calibration.fit_temperature(overconfident, labels)
    assert t == pytest.approx(5.0, rel=0.1)
    before, after = calibration.ece(overconfident, labels), calibration.ece(overconfident, labels, t)
    assert before > 0.2 and after < before / 4


def test_val_predictions_all_right_give_a_temperature_that_is_not_used():
    """All right: the NLL falls as T falls, with no minimum at a finite T; T = 1 is used, and said."""
    labels = torch.arange(400) % 4
    logits = torch.nn.functional.one_hot(labels, 4).double() * 3
    t = calibration.fit_temperature(logits, labels)
    assert t < 0.1 and calibration.nll(logits, labels, t) < 1e-9
    report = calibration.calibration_report((logits, labels), (logits, labels), 0.9)
    assert report["temperature"] == 1.0 and report["temperature_fitted"] == pytest.approx(t)
    assert report["temperature_warning"] == (
        f"T = {t:.3g} fitted on 400 val images is not used (T = 1 instead): every val prediction is right, "
        "so no finite T minimizes the NLL"
    )


def small_val(n: int = 100, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """99 of 100 right by clear margins and one wrong by a hair: T fits to about 0.2 and the lowest threshold
    for 99 % accepts all 100 at 99 % accuracy, which one more error among them would undo."""
    labels = torch.arange(n) % k
    logits = torch.zeros(n, k, dtype=torch.float64)
    logits[torch.arange(n), labels] = torch.linspace(2, 4, n, dtype=torch.float64)
    logits[0, labels[0]], logits[0, (labels[0] + 1) % k] = 1.0, 1.05
    return logits, labels


def test_a_small_val_split_backs_neither_the_temperature_nor_a_99_percent_threshold():
    val = small_val()
    fitted = calibration.fit_temperature(*val)
    assert fitted < 0.3  # what an unguarded fit would apply: every confidence near 1
    report = calibration.calibration_report(val, val, 0.99)
    assert report["temperature"] == 1.0 and report["temperature_fitted"] == pytest.approx(fitted)
    assert report["val_wrong"] == 1
    assert report["temperature_warning"] == (
        f"T = {fitted:.3g} fitted on 100 val images is not used (T = 1 instead): it rests on 1 wrong and 99 "
        "right predictions, and a temperature needs 30 or more of each to be measured (add val images)"
    )
    assert report["val_ece_after"] == report["val_ece_before"]  # nothing applied
    assert report["threshold"] is None and report["threshold_chosen"] is not None
    assert report["val_accepted"] == 100 and report["val_accuracy_at_threshold"] == pytest.approx(0.99)
    assert report["threshold_needs"] == 299 and report["test_accepted"] == 0
    assert report["threshold_warning"] == (
        f"the threshold {report['threshold_chosen']:.6f} chosen on val is not used: it accepts only 100 of "
        "100 val images, and 299 or more accepted images are needed before 99.0% accuracy can be shown (all "
        "100 right would show only 97.0% at 95% confidence); add val images or lower target_precision"
    )
    lines = calibration.describe(report)
    assert lines[0] == f"temperature: {report['temperature_warning']}"
    assert lines[-1] == (
        "threshold for 99.0% accuracy: none, so every prediction goes to review: "
        + report["threshold_warning"]
    )


def test_a_large_val_split_gets_its_temperature_and_threshold():
    (logits, labels), (test_logits, test_labels) = sampled(n=4000, seed=3), sampled(n=2000, seed=4)
    report = calibration.calibration_report((logits * 2.5, labels), (test_logits * 2.5, test_labels), 0.9)
    assert report["temperature_warning"] is None and report["threshold_warning"] is None
    assert report["temperature"] == report["temperature_fitted"] == pytest.approx(2.5, rel=0.1)
    assert report["val_wrong"] > 1000
    assert report["threshold"] == report["threshold_chosen"] is not None
    assert report["val_accepted"] >= report["threshold_needs"] == 29
    accuracy, bound = report["val_accuracy_at_threshold"], report["val_accuracy_lower_bound"]
    assert 0.9 <= accuracy and accuracy - 0.03 < bound < accuracy
    assert report["test_accepted"] > 0
    assert "(95% lower bound " in calibration.describe(report)[3]


@pytest.mark.parametrize(("target", "needed"), [(0.9, 29), (0.99, 299), (0.999, 2995)])
def test_a_threshold_needs_the_count_at_which_a_clean_record_first_shows_the_target(target, needed):
    assert calibration.needed_for(target) == needed
    assert calibration.accuracy_lower_bound(needed, needed) >= target
    assert calibration.accuracy_lower_bound(needed - 1, needed - 1) < target
    # scipy's exact interval, as the rule states it: all right gives (1 - confidence) ** (1 / n)
    assert calibration.accuracy_lower_bound(needed, needed) == pytest.approx(0.05 ** (1 / needed))


def brute_force_accuracy(confidence, correct, threshold):
    accept = confidence >= threshold
    return correct[accept].double().mean().item(), int(accept.sum())


@pytest.mark.parametrize("target", [0.8, 0.95, 0.99])
def test_threshold_is_the_lowest_that_meets_the_target(target):
    logits, labels = sampled(n=3000, seed=2)
    confidence, correct = calibration.top1(logits, labels, 1.0)
    confidence = (confidence * 50).round() / 50  # ties: images at one confidence are accepted together
    chosen = calibration.choose_threshold(confidence, correct, target)
    assert chosen.value is not None
    accuracy, accepted = brute_force_accuracy(confidence, correct, chosen.value)
    assert accuracy >= target
    assert chosen.accuracy == pytest.approx(accuracy) and chosen.accepted == accepted
    assert chosen.coverage == pytest.approx(accepted / len(correct))
    for lower in confidence[confidence < chosen.value].unique():
        assert brute_force_accuracy(confidence, correct, lower)[0] < target, lower


def test_no_threshold_reaching_the_target_is_said_and_not_invented():
    confidence = torch.tensor([0.9, 0.8, 0.7, 0.6])
    correct = torch.tensor([False, True, True, True])  # the most confident prediction is wrong
    chosen = calibration.choose_threshold(confidence, correct, 0.99)
    assert chosen.value is None and chosen.accepted == 0 and chosen.best_accuracy == 0.75
    logits = torch.log(torch.tensor([[c, 1 - c] for c in confidence.tolist()], dtype=torch.float64))
    labels = torch.tensor([1, 0, 0, 0])
    report = calibration.calibration_report((logits, labels), (logits, labels), 0.99)
    assert report["threshold"] is None and report["test_accepted"] == 0
    assert report["threshold_warning"].startswith("no confidence threshold reaches 99.0% accuracy on val")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    write_image_folder(root, classes=CLASSES, per_class=20, size=32)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, photos):
    run = tmp_path_factory.mktemp("train")
    overrides = quick_overrides("image_folder", run) + [
        f"data.root={photos}",
        "trainer.max_epochs=1",
        "optimizer.lr=0.01",  # a short run: its predictions are neither all right nor all one class
        "trainer.precision=32",
        "tta=none",  # direct_logits below is one plain pass
    ]
    train(compose_cfg("train", overrides, run / "run"))
    return sorted((run / "run" / "checkpoints").glob("best-*.ckpt"))[0]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("eval") / "run"
    overrides = [
        f"ckpt_path={checkpoint}",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "threads=2",
        "target_precision=0.9",
    ]
    return evaluate(compose_cfg("eval", overrides, out)), out


def direct_logits(checkpoint, split: str):
    """A split's logits and labels computed without the eval task."""
    module = load_classifier(str(checkpoint)).eval()
    datamodule = instantiate(OmegaConf.create(module.hparams.data), input_config=module.input_config)
    datamodule.setup()
    loader = datamodule.val_dataloader() if split == "val" else datamodule.test_dataloader()
    logits, labels = [], []
    with torch.inference_mode():
        for images, y in loader:
            logits.append(module(datamodule.to_model_input(images)).double())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def test_eval_fits_on_val_and_reports_on_test(evaluation, checkpoint):
    report, out = evaluation
    written = json.loads((out / "metrics.json").read_text())["calibration"]
    assert written == pytest.approx(report["calibration"])
    val, test = direct_logits(checkpoint, "val"), direct_logits(checkpoint, "test")
    assert written["val_images"] == len(val[1]) == 10 and written["test_images"] == len(test[1]) == 10
    fitted = calibration.fit_temperature(*val)
    assert written["temperature_fitted"] == pytest.approx(fitted, rel=1e-3)
    # 10 val images: too few wrong and right ones to measure T, too few to show 90 % (29 are needed)
    assert (
        written["temperature"] == 1.0
        and "fitted on 10 val images is not used" in written["temperature_warning"]
    )
    for split, (logits, labels) in (("val", val), ("test", test)):
        assert written[f"{split}_ece_before"] == pytest.approx(calibration.ece(logits, labels), abs=1e-5)
        assert written[f"{split}_nll_after"] == pytest.approx(calibration.nll(logits, labels), rel=1e-4)
    chosen = calibration.choose_threshold(*calibration.top1(*val, 1.0), 0.9)
    assert written["target"] == 0.9 and written["threshold"] is None
    assert written["threshold_chosen"] == (pytest.approx(chosen.value, rel=1e-4) if chosen.value else None)
    assert written["test_accepted"] == 0 and written["test_accuracy_at_threshold"] is None
    if chosen.value is None:
        assert written["threshold_warning"].startswith("no confidence threshold")
    else:
        assert written["threshold_warning"].startswith(
            f"the threshold {chosen.value:.6f} chosen on val is not used"
        )
        assert (
            f"accepts only {chosen.accepted} of 10 val images, and 29 or more" in written["threshold_warning"]
        )
    saved = json.loads((out / "calibration.json").read_text())
    assert saved["temperature"] == 1.0 and saved["threshold"] is None
    for key in (
        "temperature_fitted",
        "temperature_warning",
        "threshold_warning",
        "val_images",
        "val_accepted",
    ):
        assert saved[key] == written[key]
    assert saved["tta"] == "none" and saved["class_names"] == list(CLASSES)
    for name in ("reliability.png", "coverage.png"):
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 300


def run_predict(checkpoint, photos, tmp_path, calibration_given, extra=()):
    overrides = [f"ckpt_path={checkpoint}", f"input={photos}", "num_workers=0", "trainer.accelerator=cpu"]
    overrides += ["trainer.precision=32"]  # as direct_logits: this CPU would pick bf16 by itself
    overrides += [f"calibration={calibration_given}"] if calibration_given else []
    csv_path = predict(compose_cfg("predict", overrides + list(extra), tmp_path / "run"))
    with open(csv_path) as f:
        return list(csv.DictReader(f))


def test_predict_marks_exactly_the_rows_below_the_threshold(evaluation, checkpoint, tmp_path, capsys):
    _, out = evaluation
    saved = json.loads((out / "calibration.json").read_text())
    with open(out / "predictions.csv") as f:
        paths = [row["path"] for row in csv.DictReader(f)]  # the test split, in order
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(paths) + "\n")
    logits, _ = direct_logits(checkpoint, "test")
    expected = calibration.calibrated_probs(logits, saved["temperature"]).max(dim=1).values
    # A threshold halfway between two of these images' distinct confidences, so both marks occur.
    distinct = expected.unique()
    assert len(distinct) > 1
    threshold = (distinct[len(distinct) // 2 - 1] + distinct[len(distinct) // 2]).item() / 2
    moved = tmp_path / "calibration.json"
    # as from a val split large enough to back a threshold (this one has 10 images)
    moved.write_text(json.dumps({**saved, "threshold": threshold, "val_accepted": 1000}))
    plain = run_predict(checkpoint, listing, tmp_path / "plain", None)
    assert "review" not in plain[0]
    capsys.readouterr()
    rows = run_predict(checkpoint, listing, tmp_path / "calibrated", moved)
    assert [row["path"] for row in rows] == paths
    for row, p in zip(rows, expected.tolist(), strict=True):
        assert float(row["prob_1"]) == pytest.approx(p, abs=2e-6)
        assert row["review"] == str(p < threshold).lower()
    for row, z in zip(plain, logits, strict=True):
        assert float(row["prob_1"]) == pytest.approx(z.softmax(0).max().item(), abs=2e-6)
    marked = sum(row["review"] == "true" for row in rows)
    assert marked == int((expected < threshold).sum()) and 0 < marked < len(rows)
    assert f"review: {marked} of {len(rows)} rows marked" in capsys.readouterr().out
    # split=test of the checkpoint's own data: the same rows, calibrated probabilities and marks.
    by_split = [f"ckpt_path={checkpoint}", "split=test", "num_workers=0", "trainer.accelerator=cpu"]
    by_split += ["trainer.precision=32", f"calibration={moved}"]
    with open(predict(compose_cfg("predict", by_split, tmp_path / "split"))) as f:
        split_rows = list(csv.DictReader(f))
    kept = ("path", "review", "label_1", "prob_1")
    assert [[r[k] for k in kept] for r in split_rows] == [[r[k] for k in kept] for r in rows]
    truth = {r["path"]: r["true"] for r in split_rows}  # each tile shows its file's true class
    tiles = read_page(tmp_path / "split" / "predictions.html").tiles
    assert sorted(t.name for t in tiles) == sorted(truth)
    assert all(t.cells[0][:2] == ["true", truth[t.name]] for t in tiles)
    assert all(truth[p] == p.split("/")[-2] for p in truth)  # the class folder
    # The gallery puts the rows to review first, each group the least confident first, flagged as the CSV.
    page = read_page(tmp_path / "calibrated" / "run" / "predictions.html")
    doubtful = sorted(rows, key=lambda r: (r["review"] != "true", float(r["prob_1"])))
    assert [t.name for t in page.tiles] == [r["path"] for r in doubtful]
    assert [t.review for t in page.tiles] == [r["review"] == "true" for r in doubtful]
    # eval.py's own calibration: too few val images for a threshold, so nothing is accepted, and said why.
    capsys.readouterr()
    rows = run_predict(checkpoint, listing, tmp_path / "eval", out)
    assert all(row["review"] == "true" for row in rows)
    for row, p in zip(rows, logits.softmax(1).max(1).values.tolist(), strict=True):
        assert float(row["prob_1"]) == pytest.approx(p, abs=2e-6)  # T = 1: the fitted T was not trustworthy
    assert json.loads((out / "metrics.json").read_text())["calibration"]["test_accepted"] == 0
    assert f"review: all {len(rows)} rows marked: {saved['threshold_warning']}" in capsys.readouterr().out


def test_predict_refuses_a_threshold_too_few_val_images_back(evaluation, checkpoint, photos, tmp_path):
    """A calibration.json edited by hand, or written before eval.py checked the count, is not used."""
    _, out = evaluation
    saved = json.loads((out / "calibration.json").read_text())
    thin = tmp_path / "thin.json"
    thin.write_text(json.dumps({**saved, "threshold": 0.5, "val_accepted": 28}))
    with pytest.raises(
        SkuvisionError,
        match=r"thin\.json: its threshold for 90\.0% accuracy rests on only 28 accepted val images, and 29 ",
    ):
        run_predict(checkpoint, photos, tmp_path / "a", thin)
    old = tmp_path / "old.json"
    old.write_text(json.dumps({k: v for k, v in {**saved, "threshold": 0.5}.items() if k != "val_accepted"}))
    with pytest.raises(
        SkuvisionError, match=r"old\.json does not say how many val images back its threshold"
    ):
        run_predict(checkpoint, photos, tmp_path / "b", old)
    enough = tmp_path / "enough.json"
    enough.write_text(json.dumps({**saved, "threshold": 0.5, "val_accepted": 29}))
    assert run_predict(checkpoint, photos, tmp_path / "c", enough)


def test_eval_says_plainly_that_a_small_val_split_backs_no_threshold(checkpoint, tmp_path, caplog, capsys):
    """What an eval run prints and logs: the counts, and that every prediction goes to review."""
    overrides = [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "threads=2", "target_precision=0.9"]
    evaluate(compose_cfg("eval", overrides, tmp_path / "run"))
    printed = capsys.readouterr().out
    assert re.search(
        r"^temperature: T = \S+ fitted on 10 val images is not used \(T = 1 instead\)", printed, re.M
    )
    assert re.search(
        r"^threshold for 90\.0% accuracy: none, so every prediction goes to review: ", printed, re.M
    )
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(w.startswith("calibration: T = ") and "10 val images" in w for w in warnings)
    saved = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert f"calibration: {saved['threshold_warning']}" in warnings


def test_predict_refuses_a_calibration_of_another_checkpoint_or_tta(evaluation, checkpoint, photos, tmp_path):
    _, out = evaluation
    with pytest.raises(SkuvisionError, match="was fitted with tta=none"):
        run_predict(checkpoint, photos, tmp_path / "a", out, ["tta=flip"])
    other = tmp_path / "other.ckpt"
    other.write_bytes(checkpoint.read_bytes() + b"\0")
    with pytest.raises(SkuvisionError, match="was fitted for checkpoint"):
        run_predict(other, photos, tmp_path / "b", out)
    with pytest.raises(SkuvisionError, match="no calibration.json"):
        run_predict(checkpoint, photos, tmp_path / "c", tmp_path)


def test_data_without_val_split_skips_calibration_and_says_so(checkpoint, photos, tmp_path, caplog):
    overrides = [
        f"ckpt_path={checkpoint}",
        "data=image_folder",
        f"data.root={photos}",
        "data.split_fractions=[0.8,0,0.2]",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
    ]
    report = evaluate(compose_cfg("eval", overrides, tmp_path / "run"))
    assert "no val split" in report["calibration"]["skipped"]
    assert "calibration skipped: the data has no val split" in caplog.text
    assert "calibrate=false" in report["calibration"]["skipped"]
    assert not (tmp_path / "run" / "calibration.json").exists()
    report = evaluate(compose_cfg("eval", [*overrides, "calibrate=false"], tmp_path / "off"))
    assert "calibration" not in report
