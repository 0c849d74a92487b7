"""predict(cfg): a checkpoint on new images -> predictions.csv (path, top-k labels and probabilities).

The images are `input=` files, or `split=<name>` of the checkpoint's data (data=<option> for other data): a
split of files (image folder, manifest) is named by its paths; one of litdata shards (data=streaming) or held
in memory (Fashion-MNIST, CIFAR) by `<split>[<index>]`, in the split's stored order (skuvision.tasks.splits).
A split's rows carry the true label after `error`, named as eval.py's predictions.csv names it: `true`, or
with several heads `<column>_true` per column (empty where the row has none). Its gallery shows the true
label (one-label model) and draws in-memory images from the arrays; a split of litdata shards gets none (one
printed line says why). explain=, unknown= and prototypes= take input= files only.

With `calibration=<eval run folder>`, probabilities are temperature-scaled and a `review` column marks the
rows below the auto-tagging threshold eval.py chose on val.

A model with several heads writes, after path and error, per label column `<column>` (its top-1 label),
`<column>_prob` and, with calibration, `<column>_review` (that column's threshold; true for unreadable rows);
per tag column `<column>` (the predicted tags, joined by the training table's tag separator) and
`<column>_probs` (their probabilities, joined the same way). Tags are cut at the calibration's per-tag
thresholds, 0.5 without. Every attribute comes from skuvision.readout, as the server's answers do.

With `unknown=<eval run folder>`, two last columns (before `explanation`): `unknown_score` (higher: less like
the training catalogue; skuvision.unknown) and `unknown` (true above the threshold eval.py chose on val),
empty for unreadable rows. Without it neither is written: the kNN score needs the reference eval.py stores.

On several processes (trainer=ddp, ddp_cpu, multinode) each writes its images' logits in shards in the run
folder's shards/ and rank zero merges them into the one CSV, in input order (skuvision.shards); a rerun with
hydra.run.dir=<that run folder> skips the images finished shards hold.

With `explain=gradcam`, each readable image's Grad-CAM of its predicted class (the first label column's, with
several heads) is written to the run folder's explanations/: `<row>.png` (the overlay on the image the model
saw) and `<row>.npy` (the heatmap, float32 in [0, 1], at the model's input size), named by the row's number
in the CSV, never by the file's own name; the CSV's `explanation` column holds the PNG's path relative to the
run folder (skuvision.explain).

With `prototypes=<folder with one subfolder per new class>` (or the prototypes.npz such a run wrote), the new
classes are ranked beside the trained ones (skuvision.prototypes), and each rank gets a `source_<i>` column:
`head` or `prototype`. The prototypes of a folder are written to the run folder's prototypes.npz."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from skuvision.assembly import build_trainer, from_checkpoint
from skuvision.calibration import calibrated_probs, calibration_for_heads, load_calibration
from skuvision.config import plain, set_threads
from skuvision.data.inputs import InputFilesDataModule, collect_inputs
from skuvision.errors import SkuvisionError
from skuvision.explain import check_method, write_explanations
from skuvision.features import extract
from skuvision.gallery import (
    Answer,
    doubtful_first,
    gallery_options,
    tiles_from_predictions,
    write_gallery_and_sheet,
)
from skuvision.models.heads import Head
from skuvision.outputs import refuse_existing, write_csv
from skuvision.prototypes import FILE_NAME as PROTOTYPES_FILE
from skuvision.prototypes import Prototypes
from skuvision.readout import head_probs, read_heads
from skuvision.shards import plan_of, predict_in_shards, sharded
from skuvision.tasks.prototypes import check_prototype_options, prototypes_for
from skuvision.tasks.splits import prepared_split, split_outputs, split_pictures, with_truth
from skuvision.tasks.utils import MANDATORY_EXAMPLES, command, print_summary, resolve_checkpoint, shown
from skuvision.tta import check_tta
from skuvision.unknown import load_detector, with_unknown

log = logging.getLogger("skuvision")


def predict(cfg: DictConfig) -> Path:
    set_threads(cfg.get("threads"))
    split = check_source(cfg)
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "predictions.csv"
    if out.is_dir() and not any(out.iterdir()):
        raise SkuvisionError(
            f"output={out} is a folder: name the CSV file, e.g. output={out / 'predictions.csv'}"
        )
    explain = check_method(cfg.get("explain"))
    explained = [Path(cfg.paths.output_dir) / "explanations"] if explain else []
    gallery = gallery_options(cfg)
    pages = page_paths(out) if gallery else []
    built = [Path(cfg.paths.output_dir) / PROTOTYPES_FILE] if cfg.get("prototypes") else []
    refuse_existing([out, *pages, *explained, *built], "give another output=, or remove it")
    resolve_checkpoint(cfg)
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split=split)
    module.tta = check_tta(cfg.get("tta") or module.tta)
    paths = collect_inputs(plain(cfg.input)) if split is None else None
    trainer = build_trainer(cfg, enable_checkpointing=False)
    check_prototype_options(cfg, module, sharded(cfg, trainer))
    # Checked before any image is read: a mismatched calibration is refused up front.
    calibrated = (
        load_calibration(cfg.calibration, cfg.ckpt_path, module.tta, module.class_names, module.heads)
        if cfg.get("calibration")
        else None
    )
    multi = module.multi_head is not None
    per_head = head_calibration(calibrated, module.heads, cfg) if calibrated and multi else None
    header = attribute_header(module.heads, calibrated is not None) if multi else None
    if explain and sharded(cfg, trainer):
        raise SkuvisionError("explain=gradcam runs on one process: leave out shards= and trainer=ddp*")
    detector = load_detector(cfg.unknown, cfg.ckpt_path, module.tta) if cfg.get("unknown") else None
    if detector and sharded(cfg, trainer):
        raise SkuvisionError("unknown= runs on one process: leave out shards= and trainer=ddp*")
    prototypes = prototypes_for(cfg, module, trainer) if cfg.get("prototypes") else None
    if split is not None:
        prepared_split(datamodule, split)
        got = split_outputs(cfg, trainer, module, datamodule, "predict", tta=module.tta)
        if got is None:  # not rank zero: rank zero writes the CSV
            return out
        logits, errors, paths = got.outputs, got.errors, got.items
    elif sharded(cfg, trainer):
        plan = plan_of(
            "predict",
            cfg.ckpt_path,
            [str(p) for p in paths],
            tta=module.tta,
            precision=str(trainer.precision),
        )
        merged = predict_in_shards(cfg, trainer, module, paths, plan)
        if merged is None:  # not rank zero: rank zero writes the CSV
            return out
        logits, errors = merged
    else:
        datamodule = InputFilesDataModule(
            paths, module.input_config, cfg.batch_size, cfg.num_workers, cache=bool(cfg.get("cache", False))
        )
        with_features = detector is not None or prototypes is not None  # from the logits' pass
        found = extract(trainer, module, datamodule, logits=True, features=with_features)
        logits, errors = found.logits, found.per_image()
    if multi:
        separator = module.hparams.data.get("tag_separator") or ";"
        rows, reviews = attribute_rows(module.heads, logits, paths, errors, per_head, separator)
    else:
        embedding = found.embeddings if prototypes else None
        header, rows, review = ranked_rows(
            logits, paths, errors, calibrated, module.class_names, int(cfg.top_k), prototypes, embedding
        )
    if split is not None:
        separator = (module.hparams.data.get("tag_separator") or ";") if multi else ";"
        header, rows = with_truth(header, rows, got.labels, datamodule, separator)
    if detector:
        values = detector.scores(logits, found.features, module.heads)
        header, rows = with_unknown(header, rows, values, detector.threshold, errors)
    if explain:
        header, rows = with_explanations(cfg, module, trainer, datamodule, logits, errors, header, rows)
    write_csv(out, header, rows)
    failed = sum(bool(e) for e in errors)
    log.info("predicted %d image(s), %d unreadable", len(paths) - failed, failed)
    print(f"predictions: {out}  ({len(paths) - failed} images, {failed} unreadable)")
    if gallery:
        separator = (module.hparams.data.get("tag_separator") or ";") if multi else ";"
        tiles = tiles_from_predictions(header, rows, module.heads, separator, Path(cfg.paths.output_dir))
        if split is None or split_tiles(tiles, header, rows, datamodule, split, got.files):
            write_page(pages, tiles, gallery, f"predictions of {Path(cfg.ckpt_path).name}")
    if calibrated and multi:
        for column, flags in reviews.items():
            report_review(column_calibration(calibrated, column, per_head[1][column]), flags, failed, column)
    elif calibrated:
        report_review(calibrated, review, failed)
    if detector:
        flagged = sum(not e and v > detector.threshold for v, e in zip(values.tolist(), errors, strict=True))
        print(f"unknown: {flagged} of {len(paths) - failed} readable images flagged; {detector.describe()}")
    predict_summary(cfg, out, len(paths) - failed, failed)
    return out


def split_tiles(tiles: list, header: list[str], rows: list, datamodule, split: str, files: bool) -> bool:
    """The tiles of a split's rows given the one-label model's true label and, for `<split>[<index>]` rows,
    their pictures; False, saying why in one line, where the source cannot give those cheaply."""
    if not files:
        picture = split_pictures(datamodule, split)
        if picture is None:
            print(
                f"gallery: none for split={split} of litdata shards (its images are reachable only by "
                "reading the whole split); predict the source's files with input= for one, or gallery=false"
            )
            return False
        for i, tile in enumerate(tiles):
            tile.picture = picture(i)
    if "true" in header:
        true = header.index("true")
        for tile, row in zip(tiles, rows, strict=True):
            tile.answers.insert(0, Answer("", "truth", [(row[true], None)]))
    return True


def check_source(cfg: DictConfig) -> str | None:
    """The split to predict (None: input= files), refused in one line unless exactly one of input= and split=
    is given, or where an option takes files only."""
    split, given = cfg.get("split"), cfg.get("input")
    if given is not None and split is not None:
        raise SkuvisionError(
            f"input= and split={split} both given: predict files (input=) or a split, not both"
        )
    if given is None and split is None:
        raise SkuvisionError(
            "input is not set: give it on the command line, e.g. python predict.py "
            f"input={MANDATORY_EXAMPLES['input']}, or split=test (a split of the checkpoint's data)"
        )
    if split is None:
        if cfg.get("data") is not None:
            raise SkuvisionError("data= chooses the data of split=: with input= files leave it out")
        return None
    for option in ("explain", "unknown", "prototypes"):
        if cfg.get(option):
            raise SkuvisionError(f"{option}= takes input= files: leave it out with split={split}")
    return str(split)


def with_explanations(cfg, module, trainer, datamodule, logits, errors, header, rows):
    """The rows with an `explanation` column, after writing each readable image's overlay and heatmap."""
    if "explanation" in header:
        raise SkuvisionError(
            "explain=gradcam: a table column is named 'explanation', the column it adds; rename it"
        )
    column = next((h.column for h in module.heads if h.kind == "label"), None)
    scores = logits if not isinstance(logits, dict) else logits[column]
    relative = write_explanations(
        module,
        datamodule.predict_dataloader(),
        datamodule.to_model_input,
        scores.argmax(dim=1).tolist(),
        errors,
        Path(cfg.paths.output_dir),
        trainer.strategy.root_device,
    )
    written = sum(bool(r) for r in relative)
    print(f"explanations: {Path(cfg.paths.output_dir) / 'explanations'}  ({written} images)")
    return [*header, "explanation"], [[*row, r] for row, r in zip(rows, relative, strict=True)]


def predict_summary(cfg: DictConfig, out: Path, read: int, failed: int) -> str:
    """The CSV (and the gallery beside it, when one was written), and embed.py for the catalogue index."""
    wrote = [out] + [p for p in page_paths(out) if p.is_file()]
    return print_summary(
        "predict",
        wrote,
        {"images": read, "unreadable": failed},
        [command("embed.py", f"ckpt_path={shown(cfg.ckpt_path)}", "split=train")],
    )


def page_paths(csv_path: Path) -> list[Path]:
    """predictions.html and predictions.png beside the CSV, named after it."""
    pages = [csv_path.with_suffix(".html"), csv_path.with_suffix(".png")]
    if csv_path in pages:
        raise SkuvisionError(
            f"output={csv_path}: name a .csv file (the gallery takes .html and .png beside it)"
        )
    return pages


def write_page(pages: list[Path], tiles: list, options, title: str) -> None:
    """The gallery, doubtful first, and its contact sheet; one line saying where and how much."""
    ordered = doubtful_first(tiles)
    write_gallery_and_sheet(
        pages[0],
        pages[1],
        title,
        ordered,
        options,
        "doubtful first: review-flagged and unreadable images, then the lowest confidence",
    )
    in_page = min(len(tiles), options.max_images)
    left_out = (
        f", {len(tiles) - in_page} left out (gallery.max_images={options.max_images})"
        if in_page < len(tiles)
        else ""
    )
    print(f"gallery: {pages[0]}  ({in_page} images, doubtful first{left_out}); contact sheet: {pages[1]}")


def ranked_rows(
    logits,
    paths,
    errors,
    calibrated: dict | None,
    names: list[str],
    top_k: int,
    prototypes: Prototypes | None = None,
    features: torch.Tensor | None = None,
):
    """predictions.csv of the one-label model: header, rows (path, error, [review], top-k label/prob pairs,
    with `prototypes` each followed by its source), and the review flags (None without calibration)."""
    probs = calibrated_probs(logits, calibrated["temperature"] if calibrated else 1.0)
    if prototypes is not None:
        probs, names = prototypes.combined_probs(probs, features), prototypes.names
    k = min(top_k, probs.shape[1])
    top_probs, top_index = probs.topk(k, dim=1)
    review = needs_review(top_probs[:, 0], errors, calibrated["threshold"]) if calibrated else None
    kinds = ("label", "prob", "source") if prototypes is not None else ("label", "prob")
    ranked_header = [f"{kind}_{i}" for i in range(1, k + 1) for kind in kinds]
    rows = []
    for i, (path, error, p, idx) in enumerate(
        zip(paths, errors, top_probs.tolist(), top_index.tolist(), strict=True)
    ):
        ranked = [
            v
            for j, q in zip(idx, p, strict=True)
            for v in (names[j], f"{q:.6f}", *([prototypes.source(j)] if prototypes is not None else []))
        ]
        ranked = [""] * len(kinds) * k if error else ranked
        marked = [str(review[i]).lower()] if calibrated else []
        rows.append([str(path), error, *marked, *ranked])
    return ["path", "error", *(["review"] if calibrated else []), *ranked_header], rows, review


def head_calibration(saved: dict, heads: list[Head], cfg: DictConfig) -> tuple[dict, dict, dict]:
    """(temperatures, thresholds, tag thresholds) per column from a calibration file of this model, which must
    hold a threshold (or None) for every label column."""
    temperatures, thresholds, tag_thresholds = calibration_for_heads(saved)
    missing = [h.column for h in heads if h.kind == "label" and h.column not in thresholds]
    if missing:
        raise SkuvisionError(
            f"calibration={cfg.calibration} has no threshold for {missing}: run eval.py "
            f"ckpt_path={cfg.ckpt_path} again and pass its run folder"
        )
    return temperatures, thresholds, tag_thresholds


def column_calibration(saved: dict, column: str, threshold: float | None) -> dict:
    """What report_review reads, for one label column: its section of the file, with the threshold in use."""
    section = saved.get("heads", {}).get(column, {})
    return {"target": saved["target"], **section, "threshold": threshold}


def attribute_header(heads: list[Head], calibrated: bool) -> list[str]:
    """predictions.csv's columns for a model with several heads (refused before any image is read if a table
    column's name would be taken twice)."""
    header = ["path", "error"]
    for head in heads:
        if head.kind == "tags":
            header += [head.column, f"{head.column}_probs"]
        else:
            header += [head.column, f"{head.column}_prob", *([f"{head.column}_review"] if calibrated else [])]
    if len(set(header)) < len(header):
        raise SkuvisionError(
            f"predictions.csv would name a column twice in {header}: rename the table's columns "
            "(path, error and <column>_prob, _probs, _review are taken)"
        )
    return header


def attribute_rows(
    heads: list[Head], logits: dict, paths: list, errors: list[str], calibration: tuple | None, separator: str
) -> tuple[list[list[str]], dict[str, list[bool]]]:
    """The rows under attribute_header, and {label column: review flags} (empty without calibration)."""
    temperatures, thresholds, tag_thresholds = calibration or ({}, {}, {})
    answers = read_heads(heads, head_probs(heads, logits, temperatures), 1, thresholds, tag_thresholds)
    reviews: dict[str, list[bool]] = {h.column: [] for h in heads if calibration and h.kind == "label"}
    rows = []
    for path, error, image in zip(paths, errors, answers, strict=True):
        row = [str(path), error]
        for answer in image:
            if answer.kind == "tags":
                tags = answer.tags or []
                cells = [separator.join(t for t, _ in tags), separator.join(f"{p:.6f}" for _, p in tags)]
            else:
                cells = [answer.ranked[0][0], f"{answer.ranked[0][1]:.6f}"]
            row += [""] * len(cells) if error else cells
            if answer.column in reviews:
                reviews[answer.column].append(bool(error) or bool(answer.review))
                row.append(str(reviews[answer.column][-1]).lower())
        rows.append(row)
    return rows, reviews


def needs_review(top1: torch.Tensor, errors: list[str], threshold: float | None) -> list[bool]:
    """True where the calibrated top-1 probability is below the threshold, the image is unreadable, or no
    threshold reached the target (then nothing may be tagged without a person)."""
    return [bool(e) or threshold is None or p < threshold for p, e in zip(top1.tolist(), errors, strict=True)]


def report_review(calibrated: dict, review: list[bool], failed: int, column: str = "") -> None:
    """The review line; with several heads one per label column, named by it."""
    marked = sum(review)
    target = f"{calibrated['target']:.1%}"
    name = f" {column}" if column else ""
    if calibrated["threshold"] is None:
        why = calibrated.get("threshold_warning")  # eval.py's reason; files without one had no threshold
        why = why or f"no confidence threshold reached {target} accuracy on val"
        line = f"review{name}: all {marked} rows marked: {why}"
    else:
        line = (
            f"review{name}: {marked} of {len(review)} rows marked (calibrated top-1 probability below "
            f"{calibrated['threshold']:.6f}, the threshold for {target} accuracy on val"
            + (f"; {failed} unreadable" if failed else "")
            + f"), {len(review) - marked} accepted"
        )
    print(line)
