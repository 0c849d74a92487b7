"""Several attributes, one model: a head per column of a catalogue table against one model per attribute.

The tests' catalogue table (tests.writers: product photos whose article type, colour and tags are drawn in
them; masterCategory is a function of articleType, so the model with several heads reads it off the
articleType head) with 600 rows, photos padded square so a centre crop keeps the tag marks. The same recipe
(simple_cnn at 32 px, a few epochs, the train config's defaults otherwise) trains one model with a head per
column and one model per column; each figure is measured in the same call: test accuracy per label column
(tags: mAP), the summed training time, and inference (img/s of the one model against the separate models run
one after another on the same images, and parameters).

    python -m bench.attributes [--quick]
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from bench import THREADS
from bench.table import run_section
from skuvision.assembly import from_checkpoint
from skuvision.config import compose_config
from skuvision.data.datamodule import SPLITS, stratified_split
from skuvision.data.transforms import ToModelInput
from skuvision.tasks.export import check_images, images_per_second
from skuvision.tasks.train import train
from tests.writers import write_catalogue_table

LABELS = ["articleType", "masterCategory", "baseColour"]
TAGS = "tags"


def recipe(manifest: Path, epochs: int) -> list[str]:
    return [
        "data=manifest",
        f"data.root={manifest}",
        "data.num_workers=0",
        "data.batch_size=32",
        "model=simple_cnn",
        "model.pretrained=false",
        "input.image_size=32",
        f"trainer.max_epochs={epochs}",
        "callbacks.early_stopping=null",
        "callbacks.progress_bar=null",
        f"threads={THREADS}",
    ]


def trained(workdir: Path, name: str, overrides: list[str]) -> tuple[dict, Path]:
    """metrics.json of a training run and its best checkpoint."""
    run = workdir / name
    train(compose_config("train", overrides, run))
    metrics = json.loads((run / "metrics.json").read_text())
    return metrics, Path(metrics["checkpoint"])


def inference(checkpoints: dict[str, Path], images_count: int, batch: int, repeats: int) -> dict:
    """img/s of the model with every head and of the separate models one after another (alternating, median
    of `repeats`), on the same uint8 test images at the model's size; parameters of each side."""
    modules = {name: from_checkpoint(str(ckpt), split="test") for name, ckpt in checkpoints.items()}
    multi, datamodule = modules.pop("multi")
    test = check_images(datamodule, images_count)
    # the test split, repeated up to `images_count` (the speed does not depend on which images)
    test = test.repeat(-(-images_count // len(test)), 1, 1, 1)[:images_count]
    images = ToModelInput(multi.input_config)(test)
    singles = [module.eval() for module, _ in modules.values()]
    multi.eval()

    def all_singles(x):
        for module in singles:
            module(x)

    speeds: dict[str, list[float]] = {"multi": [], "singles": []}
    with torch.inference_mode():
        for _ in range(repeats):
            speeds["multi"].append(images_per_second(multi, images, batch))
            speeds["singles"].append(images_per_second(all_singles, images, batch))
    return {
        "multi": statistics.median(speeds["multi"]),
        "singles": statistics.median(speeds["singles"]),
        "multi_params": sum(p.numel() for p in multi.parameters()),
        "singles_params": sum(p.numel() for m in singles for p in m.parameters()),
        "images": len(images),
    }


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    n, epochs, repeats = (240, 3, 1) if quick else (600, 4, 3)
    manifest, table = write_catalogue_table(workdir / "catalogue", n=n, square=True)
    # One split column for every model: otherwise each one-label model's split is stratified by its own
    # column, and the models would be tested on different images.
    table["split"] = ""
    for split, rows in zip(SPLITS, stratified_split(table[LABELS[0]], (0.8, 0.1, 0.1), seed=0), strict=True):
        table.loc[rows, "split"] = split
    table.to_csv(manifest, index=False)
    base = recipe(manifest, epochs) + ["data.split_column=split"]
    # A table's tag column trains beside a label column (the manifest needs one): the tags-only model is the
    # tag head with the first label column's head beside it, whose accuracy is not counted here.
    configs = {
        "multi": [f"data.label_columns=[{','.join(LABELS)}]", f"data.tag_columns=[{TAGS}]"],
        **{column: [f"data.label_column={column}"] for column in LABELS},
        TAGS: [f"data.label_columns=[{LABELS[0]}]", f"data.tag_columns=[{TAGS}]"],
    }
    # Untimed: the first run in a process pays one-off costs (the data module's readability scan of the
    # photos, cached for later runs; first calls into torch and Lightning) that would count against it.
    trained(workdir, "warm-up", base + ["trainer.max_epochs=1", f"data.label_column={LABELS[0]}"])
    runs: dict[str, list[tuple[dict, Path]]] = {name: [] for name in configs}
    for r in range(repeats):  # alternating, so drifts in machine load hit every model alike
        for name, extra in configs.items():
            runs[name].append(trained(workdir, f"{name}-{r}", base + extra))
    # The fastest of each model's runs: on a shared machine the slower ones measure the other processes.
    times = {name: [m["fit/time_s"] for m, _ in done] for name, done in runs.items()}
    fit = {name: min(t) for name, t in times.items()}
    multi, multi_ckpt = runs.pop("multi")[0]
    single = {name: done[0] for name, done in runs.items()}  # the same seed each time: the first repeat
    what = f"catalogue table, {n} photos, simple_cnn @ 32 px, {epochs} epochs"
    rows = []
    for column in LABELS:
        ours, theirs = multi[f"test/{column}/acc"], single[column][0]["test/acc"]
        read_off = " (read off articleType)" if column == "masterCategory" else ""
        rows.append(
            (
                f"attributes: {column}{read_off} test accuracy, one model with 4 heads ({what})",
                f"{100 * ours:.2f} %",
                f"{100 * theirs:.2f} % (a model for {column} alone)",
                f"{100 * (ours - theirs):+.2f} points",
                "within 2 points",
            )
        )
    ours, theirs = multi[f"test/{TAGS}/map"], single[TAGS][0][f"test/{TAGS}/map"]
    rows.append(
        (
            f"attributes: {TAGS} test mAP, one model with 4 heads ({what})",
            f"{ours:.4f}",
            f"{theirs:.4f} (a model for the tags)",
            f"{ours - theirs:+.4f}",
            "within 0.02",
        )
    )
    fit_multi, fit_singles = fit["multi"], sum(fit[name] for name in single)
    rows.append(
        (
            "attributes: training time (fit), one model with 4 heads vs a model per attribute",
            f"{fit_multi:.1f} s",
            f"{fit_singles:.1f} s (4 models: {' + '.join(f'{fit[name]:.1f}' for name in single)})",
            f"{fit_multi / fit_singles:.2f}x",
            "about 1/4",
        )
    )
    speed = inference(
        {"multi": multi_ckpt} | {name: ckpt for name, (_, ckpt) in single.items()},
        images_count=128 if quick else 512,
        batch=64,
        repeats=3 if quick else 5,
    )
    rows.append(
        (
            f"attributes: inference, every attribute of {speed['images']} images (batch 64): img/s",
            f"{speed['multi']:.0f} (one model, 4 heads)",
            f"{speed['singles']:.0f} (4 models one after another)",
            f"{speed['multi'] / speed['singles']:.2f}x",
            "> 1x",
        )
    )
    rows.append(
        (
            "attributes: parameters",
            f"{speed['multi_params']:,}",
            f"{speed['singles_params']:,} (4 models)",
            f"{speed['multi_params'] / speed['singles_params']:.2f}x",
            "about 1/4",
        )
    )
    notes = [
        f"Attributes: the tests' catalogue table (tests.writers.write_catalogue_table, {n} rows, 48x64 "
        "photos padded to 64x64 so a centre crop keeps the tag marks; one 80/10/10 split column, stratified "
        f"by articleType, for every model). Every model: simple_cnn at 32 px, batch 32, {epochs} epochs, "
        "early stopping off, the train config's defaults otherwise (AdamW, one-cycle, weight EMA, flip "
        "augmentation and flip TTA on test), one seed. The model with 4 heads trains a head for articleType, "
        "baseColour and tags and reads masterCategory off the articleType head; the separate models are 3 "
        "one-label models and a tag model, which also carries an articleType head (a table's tag column "
        "trains beside a label column). Training time: fit/time_s of metrics.json (validation included, "
        f"set-up and test not), the fastest of {repeats} alternating runs of each model (accuracy: the first "
        f"run; all runs, s: {'; '.join(f'{k} ' + ', '.join(f'{t:.1f}' for t in v) for k, v in times.items())}"
        "). Inference: the tested checkpoints in float32, torch's benchmark Timer, median of alternating "
        "repeats, on the test images (repeated) already at the model's size. An untimed 1-epoch run goes "
        "first, so that no timed run pays the process's one-off costs.",
    ]
    if all(multi[f"test/{c}/acc"] == 1 and single[c][0]["test/acc"] == 1 for c in LABELS):
        notes.append(
            "Attributes: every label column is learnt perfectly both ways on this generated table (each "
            "attribute is drawn plainly in the photo), so the accuracy rows say that one backbone for all "
            "columns costs nothing here, not which side is better on real catalogues."
        )
    return rows, notes


if __name__ == "__main__":
    run_section(bench_rows, __doc__, "240 rows, 3 epochs")
