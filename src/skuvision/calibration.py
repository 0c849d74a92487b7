"""Confidence for auto-tagging: temperature scaling fitted on val, its calibration error, and the confidence
threshold above which accepted predictions reach a target accuracy.

eval.py fits both on the val split and writes them to `calibration.json` in its run folder; predict.py
applies them when given `calibration=<that folder or file>`. The file names the checkpoint (by content
hash), the TTA mode and the classes it was fitted for, and predict.py refuses any other combination.

Both are estimates from a sample, and a small val split makes them mean nothing, so each is used only when val
can carry it:

- The threshold claims that accepted images are `target` accurate. With n accepted val images all right, the
  one-sided 95 % (Clopper-Pearson) lower bound on their accuracy is 0.05 ** (1 / n); below
  n = log(0.05) / log(target) (299 for 99 %, 29 for 90 %) no val result, not even a perfect one, can show the
  target, and the threshold is not used: calibration.json holds none and predict marks every row for review.
  The lower bound itself is reported beside the val accuracy.
- The temperature is measured by the wrong predictions (and the right ones): with all right the NLL falls as T
  falls and has no minimum, and with a handful wrong T follows those few images (its spread shrinks about as
  1 / sqrt(wrong)). A fitted T is applied only with `MIN_EACH_FOR_TEMPERATURE` or more wrong and right val
  predictions and a minimum inside the search range; otherwise T = 1 is used and the fitted value reported.

With several heads (skuvision.models.heads) each label column gets both on its rows with a value, a coarser
level only a threshold on its probabilities summed from its source's calibrated ones, and each tag of a tag
column its own decision threshold (`tag_thresholds`); calibration.json holds them under "heads".
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar
from scipy.stats import binomtest
from torchmetrics.classification import MulticlassCalibrationError
from torchmetrics.functional.classification import binary_precision_recall_curve, multilabel_f1_score

from skuvision.errors import SkuvisionError
from skuvision.models.heads import Head
from skuvision.outputs import file_sha256
from skuvision.readout import DEFAULT_TAG_THRESHOLD

ECE_BINS = 15
LOG_T_BOUNDS = (math.log(0.01), math.log(100.0))
CALIBRATION_FILE = "calibration.json"
CONFIDENCE = 0.95  # of the one-sided lower bound on the accepted images' accuracy
# With 30 wrong val predictions the fitted T of one model varies by about +-25 % (95 %) between val sets
# (simulated: the standard deviation of log T is about 0.6-0.7 / sqrt(wrong)).
MIN_EACH_FOR_TEMPERATURE = 30


def calibrated_probs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logits / T) in float64, the one way eval.py and predict.py turn logits into confidences, so a
    threshold chosen by one means the same in the other."""
    return (logits.double() / temperature).softmax(dim=1)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T minimizing the mean NLL of softmax(logits / T) over [1/100, 100]. The NLL is convex in 1/T, so
    one bounded scalar search on log T finds it (scipy's Brent). When every val prediction is right (or
    every one wrong) the NLL has no minimum at a finite T: T is where the search stopped (see
    `temperature_warning`)."""
    if len(labels) == 0:
        raise ValueError("no logits to fit a temperature on")
    logits, labels = logits.double(), labels.long()
    result = minimize_scalar(
        lambda log_t: F.cross_entropy(logits / math.exp(log_t), labels).item(),
        bounds=LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-6},
    )
    return math.exp(result.x)


def temperature_warning(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> str | None:
    """Why a temperature fitted on these val logits cannot be used (see the module's rule); None if it can."""
    wrong = int((logits.argmax(dim=1) != labels).sum())
    right = len(labels) - wrong
    fitted = f"T = {temperature:.3g} fitted on {len(labels)} val images is not used (T = 1 instead): "
    if right == 0 or wrong == 0:
        return fitted + (
            f"every val prediction is {'right' if wrong == 0 else 'wrong'}, so no finite T minimizes the NLL"
        )
    if min(abs(math.log(temperature) - b) for b in LOG_T_BOUNDS) < 1e-3:
        return fitted + "the NLL falls all the way to the search bound"
    if min(right, wrong) < MIN_EACH_FOR_TEMPERATURE:
        return fitted + (
            f"it rests on {wrong} wrong and {right} right predictions, and a temperature needs "
            f"{MIN_EACH_FOR_TEMPERATURE} or more of each to be measured (add val images)"
        )
    return None


def nll(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    return F.cross_entropy(logits.double() / temperature, labels.long()).item()


def ece(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Expected calibration error of the top-1 confidence (torchmetrics, 15 equal-width bins)."""
    metric = MulticlassCalibrationError(num_classes=logits.shape[1], n_bins=ECE_BINS, norm="l1")
    return metric(calibrated_probs(logits, temperature).float(), labels.long()).item()


def coverage_curve(confidence: torch.Tensor, correct: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """For each distinct confidence t (descending): the threshold t, the number of images with
    confidence >= t, and the accuracy of those images: the precision-recall curve of "accept" against
    "the prediction is right" (torchmetrics)."""
    precision, _, thresholds = binary_precision_recall_curve(confidence, correct.long())
    precision = precision[:-1]  # the curve's last point (nothing accepted) has no threshold
    accepted = len(confidence) - torch.searchsorted(confidence.sort().values, thresholds, side="left")
    return thresholds.flip(0), accepted.flip(0), precision.double().flip(0)


@dataclass
class Threshold:
    """The lowest confidence at which the accepted images reach `target` accuracy (None: no such one)."""

    target: float
    value: float | None
    accuracy: float | None  # of the accepted images
    coverage: float  # share of images accepted
    accepted: int
    best_accuracy: float  # the highest accuracy any threshold gives (what to aim for when none reaches)


def choose_threshold(confidence: torch.Tensor, correct: torch.Tensor, target: float) -> Threshold:
    """The lowest threshold whose accepted images (confidence >= threshold) are at least `target`
    accurate: the one that accepts the most images while meeting the target."""
    thresholds, accepted, accuracy = coverage_curve(confidence, correct)
    meets = torch.nonzero(accuracy >= target).flatten()
    best = accuracy.max().item() if len(accuracy) else 0.0
    if len(meets) == 0:
        return Threshold(target, None, None, 0.0, 0, best)
    value = thresholds[meets[-1]].item()  # thresholds descend: the last one meeting the target is the lowest
    exact = accepted_accuracy(confidence, correct, value)  # counted, not the curve's float32 ratio
    return Threshold(target, value, exact["accuracy"], exact["coverage"], exact["accepted"], best)


TAG_OBJECTIVES = ("f1", "precision")


@dataclass
class TagThreshold:
    """A tag's decision threshold chosen on val (probability >= it: the tag is predicted) and what it gives
    there; `reached`: whether the objective's target was met (always for "f1")."""

    value: float
    precision: float
    recall: float
    f1: float
    reached: bool


def choose_tag_threshold(
    probs: torch.Tensor, positive: torch.Tensor, objective: str, target: float | None
) -> TagThreshold:
    """On one tag's val probabilities and 0/1 truth: "f1", the threshold of the highest F1; "precision", the
    lowest threshold whose predicted tags are at least `target` precise (none reaching it: 1.0, the tag is
    predicted only at a saturated probability). Candidates are the val probabilities (torchmetrics'
    precision-recall curve, predicted where probability >= threshold), the lowest on ties."""
    precision, recall, thresholds = binary_precision_recall_curve(probs, positive.long())
    precision, recall = precision[:-1].double(), recall[:-1].double()  # the last point has no threshold
    f1 = (2 * precision * recall / (precision + recall)).nan_to_num(0.0)
    if objective == "f1":
        best, reached = int(f1.argmax()), True  # thresholds ascend: argmax takes the lowest of equal F1s
    else:
        meets = torch.nonzero(precision >= target).flatten()
        if len(meets) == 0:
            return TagThreshold(1.0, float("nan"), 0.0, 0.0, False)
        best, reached = int(meets[0]), True
    return TagThreshold(
        float(thresholds[best]), float(precision[best]), float(recall[best]), float(f1[best]), reached
    )


def tag_thresholds(
    probs: torch.Tensor,
    targets: torch.Tensor,
    names: list[str],
    objective: str = "f1",
    target: float | None = None,
    min_support: int = 10,
) -> dict:
    """Per-tag thresholds of one tag column chosen on val ((images, tags) probabilities and 0/1 truth), as
    calibration.json holds them. A tag with fewer than `min_support` val positives gets one global threshold,
    chosen the same way over every tag's (probability, truth) pooled, and is listed in "fallback"; tags whose
    threshold cannot reach `target` precision are listed in "unreached"."""
    if objective not in TAG_OBJECTIVES:
        raise SkuvisionError(f"tag_threshold={objective!r}: use one of {', '.join(TAG_OBJECTIVES)}")
    targets = targets.long()
    support = targets.sum(dim=0).tolist()
    if targets.sum() > 0:
        pooled = choose_tag_threshold(probs.flatten(), targets.flatten(), objective, target)
    else:  # no val image has any of these tags: nothing to choose a threshold on, none can show a precision
        by_precision = objective == "precision"
        pooled = TagThreshold(
            1.0 if by_precision else DEFAULT_TAG_THRESHOLD, float("nan"), 0.0, 0.0, not by_precision
        )
    chosen, fallback, unreached = {}, [], []
    for j, name in enumerate(names):
        if support[j] < min_support:
            fallback.append(name)
            chosen[name] = pooled
        else:
            chosen[name] = choose_tag_threshold(probs[:, j], targets[:, j], objective, target)
        if not chosen[name].reached:
            unreached.append(name)
    cuts = torch.tensor([chosen[name].value for name in names], dtype=probs.dtype)
    f1 = {
        "val_f1": multilabel_f1_score((probs >= cuts).long(), targets, len(names), average=None),
        "val_f1_at_0.5": multilabel_f1_score(
            (probs >= DEFAULT_TAG_THRESHOLD).long(), targets, len(names), average=None
        ),
    }
    return {
        "thresholds": {name: chosen[name].value for name in names},
        "objective": objective,
        "target": target if objective == "precision" else None,
        "fallback": fallback,
        "global_threshold": pooled.value,
        "min_support": min_support,
        "unreached": unreached,
        "val_support": dict(zip(names, support, strict=True)),
        # Each tag's val F1 at its threshold and at 0.5 (0/1 decisions: torchmetrics applies no threshold).
        **{key: dict(zip(names, values.tolist(), strict=True)) for key, values in f1.items()},
    }


def describe_tags(report: dict) -> list[str]:
    """The lines eval.py prints about a tag column's thresholds."""
    goal = "the highest F1" if report["objective"] == "f1" else f"{report['target']:.1%} precision"
    shown = ", ".join(f"{name} {t:.3f}" for name, t in report["thresholds"].items())
    lines = [f"tag thresholds for {goal} (chosen on val): {shown}"]
    if report["fallback"]:
        lines.append(
            f"fewer than {report['min_support']} val positives, the global threshold "
            f"{report['global_threshold']:.3f} instead: {', '.join(report['fallback'])}"
        )
    if report["unreached"]:
        lines.append(
            f"no threshold reaches {goal} on val (predicted only at probability 1): "
            + ", ".join(report["unreached"])
        )
    return lines


def needed_for(target: float) -> int:
    """The fewest accepted val images whose accuracy can show `target` at all: all of them right gives the
    one-sided Clopper-Pearson lower bound (1 - CONFIDENCE) ** (1 / n), which must reach the target."""
    if not 0 < target < 1:
        raise ValueError(f"target accuracy {target} must be in (0, 1)")
    return math.ceil(math.log(1 - CONFIDENCE) / math.log(target))


def accuracy_lower_bound(right: int, count: int) -> float | None:
    """One-sided CONFIDENCE lower bound on the accuracy behind `right` of `count` (Clopper-Pearson)."""
    if count == 0:
        return None
    result = binomtest(right, count, alternative="greater")
    return float(result.proportion_ci(confidence_level=CONFIDENCE, method="exact").low)


def accepted_accuracy(confidence: torch.Tensor, correct: torch.Tensor, threshold: float | None) -> dict:
    """Accuracy and share of the images at or above `threshold` (None accepts nothing)."""
    accept = confidence >= threshold if threshold is not None else torch.zeros_like(correct, dtype=torch.bool)
    count = int(accept.sum())
    return {
        "accuracy": correct[accept].double().mean().item() if count else None,
        "coverage": count / max(len(correct), 1),
        "accepted": count,
    }


def calibration_path(given: str | Path) -> Path:
    """`calibration=`: an eval run folder (its calibration.json) or the file itself."""
    path = Path(given).expanduser()
    return path / CALIBRATION_FILE if path.is_dir() else path


# What calibration.json keeps of a label column's calibration report (the single-label file at its top level).
SAVED_FIELDS = (
    "temperature",  # the one to apply: 1 where the fit was not trustworthy
    "threshold",  # null: none that val can back, every row goes to review
    "target",
    "temperature_fitted",
    "temperature_warning",
    "threshold_chosen",
    "threshold_needs",
    "threshold_warning",
    "val_images",
    "val_wrong",
    "val_accepted",
    "val_accuracy_lower_bound",
    "val_accuracy_at_threshold",
    "val_coverage",
)
# A coarser level's (no temperature of its own: its source's).
SAVED_LEVEL_FIELDS = ("temperature_of", *(f for f in SAVED_FIELDS if not f.startswith("temperature")))
# A tag column's entry (see tag_thresholds).
SAVED_TAG_FIELDS = ("thresholds", "objective", "target", "fallback", "global_threshold", "min_support")


def load_calibration(
    given: str | Path,
    ckpt_path: str | Path,
    tta: str,
    class_names: list[str],
    heads: list[Head] | None = None,
) -> dict:
    """The calibration eval.py wrote, checked to belong to this checkpoint, TTA mode and classes; for a model
    with several heads (`heads`, skuvision.models.heads) also that its "heads" section has each head's
    column, kind and classes and valid values (read them with calibration_for_heads)."""
    path = calibration_path(given)
    if not path.is_file():
        raise SkuvisionError(
            f"calibration={given}: no {CALIBRATION_FILE} there; pass the run folder of an eval.py run that "
            "calibrated (one with a val split)"
        )
    try:
        saved = json.loads(path.read_text())
        temperature, threshold = float(saved["temperature"]), saved["threshold"]
        target = float(saved["target"])
    except (ValueError, KeyError, TypeError) as err:
        raise SkuvisionError(f"calibration={path} is not a calibration file eval.py wrote ({err})") from err
    if saved.get("checkpoint_sha256") != file_sha256(ckpt_path):
        raise SkuvisionError(
            f"calibration={path} was fitted for checkpoint {saved.get('checkpoint')}, not "
            f"ckpt_path={ckpt_path}: run eval.py ckpt_path={ckpt_path} and pass its run folder"
        )
    if saved.get("tta") != tta:
        raise SkuvisionError(
            f"calibration={path} was fitted with tta={saved.get('tta')}; predict with tta={saved.get('tta')} "
            f"or run eval.py tta={tta} and pass its run folder"
        )
    if saved.get("class_names") != list(class_names):
        raise SkuvisionError(f"calibration={path} was fitted for other classes: {saved.get('class_names')}")
    check_label_entry(path, "", {"temperature": temperature, "threshold": threshold, **saved}, target)
    if heads is not None and any(h.column for h in heads):
        check_heads(path, saved, heads)
    elif "heads" in saved:
        raise SkuvisionError(
            f"calibration={path} was fitted for a model with the heads {sorted(saved['heads'])}, not a "
            "one-label model: pass the calibration of this checkpoint's eval.py run"
        )
    return saved


def check_label_entry(path: Path, column: str, entry: dict, target: float) -> None:
    """A label column's temperature and threshold are valid, and enough val images back the threshold."""
    where = f"calibration={path}" + (f", head {column!r}," if column else "")
    threshold = entry.get("threshold")
    try:
        temperature = float(entry["temperature"]) if "temperature" in entry else 1.0
        if threshold is not None:
            threshold = float(threshold)
    except (ValueError, TypeError) as err:
        raise SkuvisionError(f"{where} is not a calibration file eval.py wrote ({err})") from err
    if not temperature > 0 or (threshold is not None and not 0 <= threshold <= 1):
        raise SkuvisionError(f"{where}: temperature {temperature} or threshold {threshold} is invalid")
    accepted = entry.get("val_accepted")
    if threshold is not None and not (0 < target < 1 and isinstance(accepted, int)):
        raise SkuvisionError(
            f"{where} does not say how many val images back its threshold (written by an earlier "
            "version): run eval.py again and pass its run folder"
        )
    if threshold is not None and accepted < needed_for(target):
        raise SkuvisionError(
            f"{where}: its threshold for {target:.1%} accuracy rests on only {accepted} accepted "
            f"val images, and {needed_for(target)} are needed: run eval.py with a larger val split"
        )


def check_heads(path: Path, saved: dict, heads: list[Head]) -> None:
    """The file's "heads" section describes exactly these heads (column, kind, classes, source)."""
    section = saved.get("heads")
    rerun = "run eval.py on this checkpoint and pass its run folder"
    if not isinstance(section, dict):
        raise SkuvisionError(f'calibration={path} has no "heads" section for this model\'s heads: {rerun}')
    if sorted(section) != sorted(h.column for h in heads):
        raise SkuvisionError(
            f"calibration={path} is for the heads {sorted(section)}, this checkpoint has "
            f"{sorted(h.column for h in heads)}: {rerun}"
        )
    for head in heads:
        entry = section[head.column]
        if not isinstance(entry, dict) or entry.get("classes") != head.classes:
            raise SkuvisionError(
                f"calibration={path}, head {head.column!r}: fitted for other classes than this "
                f"checkpoint's {len(head.classes)}: {rerun}"
            )
        if head.kind == "tags":
            thresholds = entry.get("thresholds")
            if (
                not isinstance(thresholds, dict)
                or sorted(thresholds) != sorted(head.classes)
                or not all(isinstance(t, (int, float)) and 0 <= t <= 1 for t in thresholds.values())
            ):
                raise SkuvisionError(
                    f"calibration={path}, head {head.column!r}: needs a threshold in [0, 1] for each of its "
                    f"tags {head.classes}: {rerun}"
                )
            continue
        if "thresholds" in entry or entry.get("temperature_of") != head.source:
            what = f"read off {head.source!r}" if head.derived else "a trained label head"
            raise SkuvisionError(f"calibration={path}, head {head.column!r}: not fitted as {what}: {rerun}")
        if not head.derived and "temperature" not in entry:
            raise SkuvisionError(f"calibration={path}, head {head.column!r} has no temperature: {rerun}")
        check_label_entry(path, head.column, entry, float(entry.get("target", saved["target"])))


def calibration_for_heads(
    saved: dict,
) -> tuple[dict[str, float], dict[str, float | None], dict[str, dict[str, float]]]:
    """What skuvision.readout applies from a calibration.json load_calibration accepted: ({trained label
    column: temperature}, {label column: review threshold or None}, {tag column: {tag: threshold}}). A
    one-label model's file gives its values under the column ""."""
    if "heads" not in saved:
        return {"": float(saved["temperature"])}, {"": saved["threshold"]}, {}
    temperatures, thresholds, tag_thresholds = {}, {}, {}
    for column, entry in saved["heads"].items():
        if "thresholds" in entry:
            tag_thresholds[column] = {tag: float(t) for tag, t in entry["thresholds"].items()}
            continue
        if "temperature" in entry:
            temperatures[column] = float(entry["temperature"])
        thresholds[column] = None if entry["threshold"] is None else float(entry["threshold"])
    return temperatures, thresholds, tag_thresholds


def top1(logits: torch.Tensor, labels: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibrated top-1 confidence, whether the top-1 class is right) per image."""
    confidence, predicted = calibrated_probs(logits, temperature).max(dim=1)
    return confidence, predicted == labels


def calibration_report(val: tuple, test: tuple, target: float) -> dict:
    """Temperature fitted on `val` (logits, labels) and applied where val can carry it; calibration error
    before and after on both splits; the threshold for `target` accuracy chosen on val, used where enough val
    images back it, and what it gives on test."""
    fitted = fit_temperature(*val)
    temperature_reason = temperature_warning(*val, fitted)
    temperature = 1.0 if temperature_reason else fitted
    report: dict = {
        "temperature": temperature,
        "temperature_fitted": fitted,
        "temperature_warning": temperature_reason,
    }
    return report | errors_and_threshold(
        {"val": val, "test": test}, {"val": val, "test": test}, temperature, target
    )


def level_report(before: dict, after: dict, source: str, temperature: float, target: float) -> dict:
    """calibration_report's figures for a coarser level read off `source` (skuvision.models.heads), which
    has no temperature of its own: `before` and `after` are {split: (log-probabilities, labels)}, the level's
    probabilities summed from the source's before and after its temperature (T = `temperature`)."""
    report = {"temperature_of": source, "source_temperature": temperature, "temperature_warning": None}
    return report | errors_and_threshold(before, after, 1.0, target)


def errors_and_threshold(before: dict, after: dict, temperature: float, target: float) -> dict:
    """ECE and NLL of {split: (logits, labels)} before (T = 1) and after (`after`'s logits at `temperature`),
    the threshold for `target` accuracy chosen on val's calibrated top-1, and what it gives on test."""
    val = after["val"]
    report: dict = {
        "target": target,
        "ece_bins": ECE_BINS,
        "val_wrong": int((val[0].argmax(dim=1) != val[1]).sum()),
    }
    for split in ("val", "test"):
        report[f"{split}_images"] = len(after[split][1])
        for when, (logits, labels), t in (
            ("before", before[split], 1.0),
            ("after", after[split], temperature),
        ):
            report[f"{split}_ece_{when}"] = ece(logits, labels, t)
            report[f"{split}_nll_{when}"] = nll(logits, labels, t)
    confidence, correct = top1(*val, temperature)
    chosen = choose_threshold(confidence, correct, target)
    needed = needed_for(target)
    supported = chosen.value is not None and chosen.accepted >= needed
    right = int(correct[confidence >= chosen.value].sum()) if chosen.value is not None else 0
    report |= {
        "threshold": chosen.value if supported else None,
        "threshold_chosen": chosen.value,
        "threshold_needs": needed,
        "val_accuracy_at_threshold": chosen.accuracy,
        "val_accuracy_lower_bound": accuracy_lower_bound(right, chosen.accepted),
        "val_coverage": chosen.coverage,
        "val_accepted": chosen.accepted,
        "val_best_accuracy": chosen.best_accuracy,
    }
    on_test = accepted_accuracy(*top1(*after["test"], temperature), report["threshold"])
    report |= {
        "test_accuracy_at_threshold": on_test["accuracy"],
        "test_coverage": on_test["coverage"],
        "test_accepted": on_test["accepted"],
    }
    report["threshold_warning"] = threshold_warning(report)
    return report


def describe(report: dict) -> list[str]:
    """The lines eval.py prints (and logs) about calibration and the threshold."""
    r = report
    if "temperature_of" in r:  # a coarser level (level_report)
        temperature = (
            f"probabilities: sums of {r['temperature_of']}'s calibrated ones "
            f"(its T = {r['source_temperature']:.4f}; {r['val_images']} val images, {r['val_wrong']} wrong)"
        )
    else:
        temperature = (
            f"temperature T = {r['temperature']:.4f} (fitted on {r['val_images']} val images, "
            f"{r['val_wrong']} wrong)"
        )
    if r["temperature_warning"]:
        temperature = f"temperature: {r['temperature_warning']}"
    lines = [
        temperature,
        f"ECE ({r['ece_bins']} bins)  val {r['val_ece_before']:.4f} -> {r['val_ece_after']:.4f}   "
        f"test {r['test_ece_before']:.4f} -> {r['test_ece_after']:.4f}",
        f"NLL             val {r['val_nll_before']:.4f} -> {r['val_nll_after']:.4f}   "
        f"test {r['test_nll_before']:.4f} -> {r['test_nll_after']:.4f}",
    ]
    target = f"{r['target']:.1%}"
    if r["threshold"] is None:
        return [
            *lines,
            f"threshold for {target} accuracy: none, so every prediction goes to review: "
            + r["threshold_warning"],
        ]
    lines.append(
        f"threshold for {target} accuracy (chosen on val): {r['threshold']:.6f}, accepts "
        f"{r['val_coverage']:.1%} of val ({r['val_accepted']} images) at "
        f"{r['val_accuracy_at_threshold']:.2%} ({CONFIDENCE:.0%} lower bound "
        f"{r['val_accuracy_lower_bound']:.2%})"
    )
    test_acc = r["test_accuracy_at_threshold"]
    lines.append(
        f"on test: accepts {r['test_coverage']:.1%} ({r['test_accepted']} images) at "
        + (f"{test_acc:.2%} accuracy" if test_acc is not None else "no accuracy (none accepted)")
    )
    return lines


def threshold_warning(report: dict) -> str | None:
    """Why there is no threshold, or why the one val gave is not used (too few accepted val images for the
    target to mean anything); None when neither."""
    target, accepted = f"{report['target']:.1%}", report["val_accepted"]
    if report["threshold_chosen"] is None:
        return (
            f"no confidence threshold reaches {target} accuracy on val (the best any threshold gives is "
            f"{report['val_best_accuracy']:.2%}): every prediction needs review; lower target_precision"
        )
    if report["threshold"] is None:
        return (
            f"the threshold {report['threshold_chosen']:.6f} chosen on val is not used: it accepts only "
            f"{accepted} of {report['val_images']} val images, and {report['threshold_needs']} or more "
            f"accepted images are needed before {target} accuracy can be shown (all {accepted} right would "
            f"show only {accuracy_lower_bound(accepted, accepted):.1%} at {CONFIDENCE:.0%} confidence); add "
            "val images or lower target_precision"
        )
    return None
