"""The model card export.py writes beside what it exports (README.md, in Hugging Face's layout: YAML front
matter, then sections): the data, the recipe, the test figures eval.py reports for the checkpoint (measured
once here with eval.py's own functions on the checkpoint's test split; with card.test_figures=false not
measured, and the card says so), the calibration when given, the files and the known limits."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from omegaconf import DictConfig

from skuvision import calibration
from skuvision.assembly import build_trainer
from skuvision.checkpoints import RECORD, read_checkpoint
from skuvision.data.datamodule import ImageDataModule
from skuvision.errors import SkuvisionError
from skuvision.metrics import evaluation_report
from skuvision.models.classifier import Classifier
from skuvision.readout import concat_batches
from skuvision.tasks.evaluate import heads_report

CARD = "README.md"

# The test figures by the model-index metric type Hugging Face lists them under.
METRIC_TYPES = {
    "acc": "accuracy",
    "f1_macro": "f1",
    "f1_weighted": "f1",
    "auroc_macro": "roc_auc",
    "loss": "loss",
}


def test_figures(
    cfg: DictConfig, module: Classifier, datamodule: ImageDataModule, saved: dict | None
) -> dict:
    """eval.py's metrics.json content for this checkpoint and TTA, from the same functions: the one-label
    model's evaluation_report; with several heads heads_report at the calibration's tag thresholds (0.5
    without one, as eval.py calibrate=false). The module is back on the CPU after."""
    trainer = build_trainer(cfg, enable_checkpointing=False)
    outputs = trainer.predict(module, datamodule=datamodule)
    module.cpu()
    logits = concat_batches([o["outputs"] for o in outputs])
    labels = concat_batches([o["meta"] for o in outputs])
    if module.multi_head is None:
        return evaluation_report(logits, labels, module.class_names)
    tags = calibration.calibration_for_heads(saved)[2] if saved else {}
    how = "chosen on val (the calibration given)" if saved else "0.5 (no calibration)"
    return heads_report(module.heads, logits, labels, tags, how)


def wants_test_figures(cfg: DictConfig) -> bool:
    """export.py's card.test_figures: whether the card measures the test split (a boolean, checked first)."""
    value = (cfg.get("card") or {}).get("test_figures", True)
    if not isinstance(value, bool):
        raise SkuvisionError(
            f"card.test_figures={value}: give true (measure the test split for the model card) or false"
        )
    return value


def scalars(report: dict) -> dict[str, float]:
    """The `test/...` figures of a report, as eval.py's metrics.json has them at its top level."""
    return {k: v for k, v in report.items() if k.startswith("test/") and isinstance(v, (int, float))}


def training_record(ckpt_path: Path) -> tuple[Path | None, dict]:
    """The train run folder of a checkpoint in its checkpoints/, and its metrics.json (empty if none)."""
    run = ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else None
    if run is None or not (run / RECORD).is_file():
        return run, {}
    try:
        return run, json.loads((run / RECORD).read_text())
    except ValueError:
        return run, {}


def front_matter(module: Classifier, fmt: str, figures: dict[str, float], data_name: str) -> str:
    name = module.hparams.model.get("name", "model")
    metrics = [
        {"type": METRIC_TYPES.get(key.split("/")[-1], key.split("/")[-1]), "name": key, "value": value}
        for key, value in figures.items()
        if key != "test/num_images"  # a count, not a metric: in the Test figures table
    ]
    meta = {
        "library_name": "timm" if fmt == "timm" else "onnx",
        "pipeline_tag": "image-classification",
        "tags": ["image-classification", "skuvision", "timm" if fmt == "timm" else "onnx"],
    }
    if not metrics:  # not measured (card.test_figures=false): no results rather than empty ones
        return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"
    meta |= {
        "metrics": sorted({m["type"] for m in metrics} & {"accuracy", "f1", "roc_auc"}),
        "model-index": [
            {
                "name": str(name),
                "results": [
                    {
                        "task": {"type": "image-classification", "name": "Image Classification"},
                        "dataset": {"name": data_name, "type": "imagefolder", "split": "test"},
                        "metrics": metrics,
                    }
                ],
            }
        ],
    }
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def data_section(module: Classifier, counts: dict | None) -> str:
    hp = module.hparams
    source = hp.data.get("_target_", "?").rsplit(".", 1)[-1]
    text = f"## Data\n\n{source} at `{hp.data.get('root', '?')}`, {len(module.class_names)} classes.\n\n"
    if not counts:
        return text + "Images per class and split: not recorded (no class_counts.json in the run folder).\n"
    splits = list(counts)
    rows = [[c] + [counts[s].get(c, 0) for s in splits] for c in next(iter(counts.values()))]
    rows.append(["**total**"] + [sum(counts[s].values()) for s in splits])
    return (
        text
        + "Images per class and split (class_counts.json of the training run):\n\n"
        + table(["class", *splits], rows)
    )


def recipe_section(module: Classifier, checkpoint: dict, record: dict) -> str:
    hp = module.hparams
    model = hp.model
    weights = model.get("weights") or ("timm's pretrained weights" if model.get("pretrained") else "none")
    finetune = hp.get("finetune") or {}
    strategy = str(finetune.get("_target_", "?")).rsplit(".", 1)[-1]
    options = ", ".join(f"{k}={v}" for k, v in finetune.items() if k != "_target_")
    optimizer = hp.get("optimizer") or {}
    ic = module.input_config
    rows = [
        ["backbone", f"`{model.get('name', model.get('_target_'))}`"],
        ["pretrained weights", weights],
        ["fine-tuning", f"{strategy}" + (f" ({options})" if options else "")],
        [
            "optimizer",
            f"{str(optimizer.get('_target_', '?')).rsplit('.', 1)[-1]}, lr {optimizer.get('lr')}, "
            f"weight decay {optimizer.get('weight_decay')}",
        ],
        ["label smoothing", hp.get("label_smoothing")],
        ["epochs trained", f"{int(checkpoint.get('epoch', -1)) + 1} (step {checkpoint.get('global_step')})"],
        ["input", f"{ic['input_size'][0]} x {ic['input_size'][1]} x {ic['input_size'][2]} (C x H x W)"],
        [
            "resize",
            f"{ic['interpolation']}, crop_pct {ic['crop_pct']}, crop mode {ic.get('crop_mode', 'center')}",
        ],
        ["mean / std", f"{list(ic['mean'])} / {list(ic['std'])}"],
        ["test-time augmentation", module.tta],
    ]
    if "val/acc_best" in record:
        rows.append(["best val accuracy", f"{record['val/acc_best']:.4f}"])
    return "## Training recipe\n\n" + table(["", ""], rows)


def metrics_section(report: dict | None, figures: dict, module: Classifier) -> str:
    if report is None:
        return (
            "## Test figures\n\nNot measured: export.py ran with `card.test_figures=false`, so this card "
            "holds no accuracy. `python eval.py ckpt_path=<this checkpoint>` measures them on the "
            "test split (or export again without that override).\n\nClasses, in the model's output order: "
            + ", ".join(f"`{c}`" for c in module.class_names)
            + "\n"
        )
    text = (
        "## Test figures\n\nMeasured by export.py on the checkpoint's test split with eval.py's own "
        "functions "
        f"(TTA {module.tta}); `python eval.py ckpt_path=<this checkpoint>` reports the same in its "
        "metrics.json.\n\n"
    )
    text += table(
        ["metric", "value"], [[k, f"{v:.4f}" if isinstance(v, float) else v] for k, v in figures.items()]
    )
    if "per_class" in report:
        rows = [
            [name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", m["support"]]
            for name, m in report["per_class"].items()
        ]
        text += "\nPer class, in the model's output order:\n\n" + table(
            ["class", "precision", "recall", "F1", "test images"], rows
        )
    else:
        text += (
            "\nClasses, in the model's output order: "
            + ", ".join(f"`{c}`" for c in module.class_names)
            + "\n"
        )
    return text


def calibration_section(saved: dict | None, given: str | None) -> str:
    if not saved:
        return (
            "## Calibration\n\nNone given: the probabilities are the softmax of the logits (temperature 1) "
            "and no review threshold is set. `python eval.py ckpt_path=...` fits both on val; pass its run "
            "folder as `calibration=` to export.py (and predict.py).\n"
        )
    threshold, target = saved.get("threshold"), float(saved["target"])
    return (
        f"## Calibration\n\nFrom `{given}` (eval.py, fitted on the val split): temperature "
        f"{float(saved['temperature']):.4f}; "
        + (
            f"review threshold {threshold:.4f}: predictions less confident go to a person, the accepted "
            f"ones reached {target:.0%} accuracy on val.\n"
            if threshold is not None
            else f"no review threshold (val was too small to show {target:.0%} accuracy for any), so "
            "predict.py sends every prediction to review.\n"
        )
    )


def heads_section(module: Classifier, fmt: str) -> str:
    if module.multi_head is None:
        return ""
    rows = [
        [
            f"`{h.column}`",
            h.kind,
            len(h.classes),
            h.source or "",
            ", ".join(h.classes[:8]) + (" ..." if len(h.classes) > 8 else ""),
        ]
        for h in module.heads
    ]
    where = (
        "one ONNX output per head, named by its column, in this order"
        if fmt == "onnx"
        else "config.json's `heads`: the trained heads' outputs side by side in one classifier"
    )
    return (
        "## Heads\n\nOne head per label or tag column ("
        + where
        + "):\n\n"
        + table(["column", "kind", "classes", "read off", "first classes"], rows)
    )


def files_section(fmt: str, out: Path, ckpt_path: Path) -> str:
    if fmt == "timm":
        return (
            "## Files\n\n- `config.json`: the architecture, class names and input config (timm's format)\n"
            "- `model.safetensors`: the weights\n\nLoad with plain timm: "
            f'`timm.create_model("local-dir:{out}", pretrained=True)`.\n'
        )
    return (
        f"## Files\n\n- `{out.name}`: the graph. It takes uint8 images (N, C, H, W) at the input size and "
        "does the scaling and normalization itself; a deployment only resizes and crops.\n"
        f"- `{out.name}.data`: the weights. torch's exporter stores them beside a small graph file (ONNX's "
        "external data); the graph names this file, so keep the two together under these names.\n"
        f"- `{out.with_suffix('.json').name}`: the class names and input config serve.py checks.\n\n"
        f"Serve with `python serve.py ckpt_path={ckpt_path.absolute()} serve.backend=onnx "
        f"serve.onnx_path={out.absolute()}`.\n"
    )


def limits_section(module: Classifier, figures: dict) -> str:
    images = figures.get("test/num_images")
    return (
        "## Known limits\n\n"
        f"- It knows only these {len(module.class_names)} classes: a photo of anything else still gets "
        "one of them. The review threshold (see Calibration) is the guard.\n"
        + (
            f"- The test figures come from {images} images: with few test images they are uncertain by "
            "several points.\n"
            if images
            else ""
        )
        + "- Photos unlike the training ones (other lighting, backgrounds, cameras, crops) may score lower "
        "than the test figures.\n"
        "- Not measured: fairness or behaviour on people; not meant for decisions about people.\n"
    )


def card_text(
    module: Classifier,
    ckpt_path: Path,
    fmt: str,
    out: Path,
    report: dict | None,
    saved: dict | None,
    given: str | None,
) -> str:
    """README.md for the exported model; `report` None: the test figures were not measured (the card says
    so, and its front matter lists no results)."""
    checkpoint = read_checkpoint(ckpt_path)
    run, record = training_record(ckpt_path)
    counts = None
    if run is not None and (run / "class_counts.json").is_file():
        counts = json.loads((run / "class_counts.json").read_text())
    figures = scalars(report) if report is not None else {}
    data_name = Path(str(module.hparams.data.get("root", "data"))).name or "data"
    name = module.hparams.model.get("name", "model")
    return "\n".join(
        [
            front_matter(module, fmt, figures, data_name),
            f"# {name}: {len(module.class_names)}-class image classifier\n\n"
            f"Fine-tuned with skuvision (checkpoint `{ckpt_path.absolute()}`) and exported as {fmt}.\n",
            data_section(module, counts),
            recipe_section(module, checkpoint, record),
            metrics_section(report, figures, module),
            calibration_section(saved, given),
            heads_section(module, fmt),
            files_section(fmt, out, ckpt_path),
            limits_section(module, figures),
        ]
    ).replace("\n\n\n", "\n\n")
