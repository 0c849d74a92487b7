"""export(cfg): a checkpoint -> ONNX (format=onnx) or timm's own folder format (format=timm).

ONNX: the exported graph takes uint8 images (N, C, H, W) at the model's input size and does the scaling and
normalization itself, so a deployment only resizes and crops (or pads) as input.crop_mode says; checked
against PyTorch with onnxruntime. model.json beside it holds the class names and the input config. A model
with several heads has one output per head, named by its column, in head order (coarser taxonomy levels
computed in the graph), and model.json lists the heads.

timm: config.json + model.safetensors written by timm's own `save_for_hf` (what `push_to_hf_hub` uploads),
with the class names and the checkpoint's input config as the pretrained config; plain timm loads it with
`timm.create_model("local-dir:<folder>", pretrained=True)`. It is loaded back that way and checked against
the checkpoint's logits. The weights are the checkpoint's (the EMA average, where training kept one). A model
with several heads is written as one classifier whose outputs are its trained heads' side by side (see
`concatenated_heads`); config.json's "heads" says which outputs are whose.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import onnxruntime as ort
import timm
import torch
from omegaconf import DictConfig
from torch import nn

from skuvision.assembly import from_checkpoint
from skuvision.calibration import load_calibration
from skuvision.config import set_threads
from skuvision.data.datamodule import ImageDataModule
from skuvision.data.transforms import ToModelInput, crop_mode
from skuvision.errors import SkuvisionError
from skuvision.models.classifier import Classifier
from skuvision.models.heads import set_classifier
from skuvision.outputs import (
    new_file,
    new_file_with_companions,
    new_folder,
    refuse_existing,
    write_new_json,
    write_new_text,
)
from skuvision.tasks.card import CARD, card_text, test_figures, wants_test_figures
from skuvision.tasks.quantize import (
    card_section,
    check_one_label,
    check_quantize,
    int8_path,
    write_and_check_int8,
)
from skuvision.tasks.utils import command, print_summary, resolve_checkpoint, shown

log = logging.getLogger("skuvision")


class Deployable(nn.Module):
    """uint8 images at the model's size -> logits: normalization plus the backbone. With several heads, a
    tuple of every head's logits in head order (derived levels completed in the graph): ONNX outputs are
    positional, so a dict could not carry the names (output_names does)."""

    def __init__(self, module: Classifier):
        super().__init__()
        self.to_model_input = ToModelInput(module.input_config)
        self.backbone = module.backbone
        self.complete = module.multi_head.complete if module.multi_head is not None else None

    def forward(self, images: torch.Tensor):
        out = self.backbone(self.to_model_input(images))
        if self.complete is None:
            return out
        return tuple(self.complete(out).values())


def output_names(module: Classifier) -> list[str]:
    """The ONNX outputs: `logits`, or one per head named by its column."""
    return ["logits"] if module.multi_head is None else [h.column for h in module.heads]


def head_cards(module: Classifier) -> list[dict]:
    """What model.json and config.json say of each head: column, kind, classes, and the trained head a coarser
    level is read off (null for a trained head)."""
    return [
        {"column": h.column, "kind": h.kind, "classes": h.classes, "source": h.source} for h in module.heads
    ]


def check_images(datamodule: ImageDataModule, count: int) -> torch.Tensor:
    """`count` real test images (uint8, at the model's size) from the data module."""
    datamodule.prepare_data()
    datamodule.setup("test")
    batch = []
    for images, _ in datamodule.test_dataloader():
        batch.append(datamodule.to_model_input.resize_crop(images))
        if sum(len(b) for b in batch) >= count:
            break
    return torch.cat(batch)[:count]


def images_per_second(run, images: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """`run` over `images` in batches, after one warm-up batch; torch's Timer syncs a GPU around it."""

    def all_batches():
        for i in range(0, len(images), batch_size):
            run(images[i : i + batch_size])

    # torch's benchmark module loads cpp_extension, which warns that CUDA_HOME has no runtime on a CPU machine
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils import benchmark

    run(images[:batch_size])
    # Timer runs at 1 thread unless told otherwise
    timer = benchmark.Timer(
        "all_batches()", globals={"all_batches": all_batches}, num_threads=torch.get_num_threads()
    )
    measured = timer.timeit(repeats)
    return len(images) / measured.median


FORMATS = ("onnx", "timm")


def export(cfg: DictConfig) -> dict:
    set_threads(cfg.get("threads"))
    fmt = cfg.get("format", "onnx")
    if fmt not in FORMATS:
        raise SkuvisionError(f"format={fmt}: choose one of {', '.join(FORMATS)}")
    run_dir = Path(cfg.paths.output_dir)
    if fmt == "timm":
        out = Path(cfg.output) if cfg.get("output") else run_dir / "timm"
        written = [out]
    else:
        out = Path(cfg.output) if cfg.get("output") else run_dir / "model.onnx"
        # <name>.data: the external weights torch's exporter writes beside the model, named in it
        written = [
            out,
            out.with_name(out.name + ".data"),
            out.with_suffix(".json"),
            run_dir / "export_check.json",
        ]
    card_file = out / CARD if fmt == "timm" else out.parent / CARD
    if check_quantize(cfg):
        written += [int8_path(out), int8_path(out).with_suffix(".json")]
    refuse_existing(written + [card_file], "give another output=, or remove it")
    measure = wants_test_figures(cfg)
    resolve_checkpoint(cfg)
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split="test")
    check_one_label(cfg.get("quantize"), module.multi_head is not None)
    saved = (
        load_calibration(cfg.calibration, cfg.ckpt_path, module.tta, module.class_names, module.heads)
        if cfg.get("calibration")
        else None
    )
    report = test_figures(cfg, module, datamodule, saved) if measure else None
    card = card_text(module, Path(cfg.ckpt_path), fmt, out, report, saved, cfg.get("calibration"))
    if fmt == "timm":
        result = export_timm(cfg, module, datamodule, out, card)
    else:
        result = export_onnx(cfg, module, datamodule, out)
        if "int8" in result:
            card += "\n" + card_section(result["int8"], int8_path(out))
        write_new_text(card_file, card)
    result["card"] = str(card_file)
    export_summary(cfg, fmt, out, card_file, result)
    return result


def export_summary(cfg: DictConfig, fmt: str, out: Path, card_file: Path, result: dict) -> str:
    """The files and the command that uses them: serve.py on the ONNX file, or plain timm on the folder."""
    figures = {"max |diff|": f"{result['max_abs_diff']:.2e}", "images": result["images"]}
    if fmt == "timm":
        use = f"python -c \"import timm; timm.create_model('local-dir:{shown(out)}', pretrained=True)\""
        return print_summary("export", [out, card_file], figures, [use])
    wrote = [out, out.with_name(out.name + ".data"), out.with_suffix(".json"), card_file]
    served = [out]
    if "int8" in result:
        int8 = result["int8"]
        wrote += [int8_path(out), int8_path(out).with_suffix(".json")]
        served.append(int8_path(out))
        figures["INT8 test accuracy"] = f"{int8['int8_accuracy']:.2%} (fp32 {int8['fp32_accuracy']:.2%})"
        figures["INT8 top-1 agreement"] = f"{int8['top1_agreement']:.2%}"
    serve = [
        command(
            "serve.py",
            f"ckpt_path={shown(cfg.ckpt_path)}",
            "serve.backend=onnx",
            f"serve.onnx_path={shown(p)}",
        )
        for p in served
    ]
    return print_summary("export", [p for p in wrote if p.exists()], figures, serve)


def export_onnx(cfg: DictConfig, module: Classifier, datamodule: ImageDataModule, out: Path) -> dict:
    """The model is written under a temporary name and checked there: only one within tolerance is kept."""
    model = Deployable(module).eval()
    images = check_images(datamodule, cfg.check_images)
    quantize = check_quantize(cfg)
    with new_file_with_companions(out) as partial:
        result = write_and_check_onnx(cfg, model, module, images, partial)
        if quantize:  # inside: a refused INT8 model publishes neither file
            with new_file(int8_path(out)) as int8_partial:
                result["int8"] = write_and_check_int8(
                    cfg, module, datamodule, partial, int8_partial, images, images_per_second
                )
    result["onnx"] = str(out)
    card = {
        "class_names": module.class_names,
        "input": module.input_config,
        "input_dtype": "uint8",
        "checkpoint": str(cfg.ckpt_path),
    }
    if module.multi_head is not None:
        card["outputs"] = output_names(module)
        card["heads"] = head_cards(module)
    write_new_json(out.with_suffix(".json"), card)
    if quantize:
        result["int8"]["onnx"] = str(int8_path(out))
        write_new_json(int8_path(out).with_suffix(".json"), card | {"int8": result["int8"]})
    write_new_json(Path(cfg.paths.output_dir) / "export_check.json", result)
    print(f"ONNX: {out}")
    return result


def write_and_check_onnx(cfg: DictConfig, model: Deployable, module: Classifier, images, out: Path) -> dict:
    try:
        torch.onnx.export(
            model,
            (images[:2],),
            str(out),
            input_names=["images"],
            output_names=output_names(module),
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=cfg.opset,
            dynamo=True,
            verbose=False,  # else the exporter prints each of its steps
        )
    except Exception as err:  # the exporter's errors are long; the first line says what failed
        raise SkuvisionError(
            f"ONNX export of {module.hparams.model['name']} failed: {str(err).splitlines()[0]}"
        ) from err
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    names = output_names(module)
    with torch.inference_mode():
        reference = model(images)
    reference = [reference.numpy()] if module.multi_head is None else [r.numpy() for r in reference]
    batches = [
        session.run(names, {"images": images[i : i + cfg.batch_size].numpy()})
        for i in range(0, len(images), cfg.batch_size)
    ]
    diffs = {
        name: float(np.abs(np.concatenate([b[k] for b in batches]) - reference[k]).max())
        for k, name in enumerate(names)
    }
    max_diff = max(diffs.values())
    with torch.inference_mode():
        torch_speed = images_per_second(model, images, cfg.batch_size)
    onnx_speed = images_per_second(lambda x: session.run(None, {"images": x.numpy()}), images, cfg.batch_size)
    print(
        f"max |onnxruntime - pytorch| = {max_diff:.2e} over {len(images)} real test images\n"
        f"img/s: pytorch {torch_speed:.0f}, onnxruntime {onnx_speed:.0f} (batch {cfg.batch_size}, CPU)"
    )
    if max_diff > cfg.tolerance:
        raise SkuvisionError(
            f"onnxruntime differs from PyTorch by {max_diff:.2e} > tolerance={cfg.tolerance}: "
            "nothing was written"
        )
    result = {
        "max_abs_diff": max_diff,
        "images": len(images),
        "pytorch_img_per_s": torch_speed,
        "onnxruntime_img_per_s": onnx_speed,
    }
    if module.multi_head is not None:
        result["max_abs_diff_per_head"] = diffs
    return result


def timm_data_config(input_config: dict) -> dict:
    """The checkpoint's input config in timm's data-config keys (crop as timm's eval transform does it)."""
    return {
        "input_size": tuple(input_config["input_size"]),
        "mean": tuple(input_config["mean"]),
        "std": tuple(input_config["std"]),
        "interpolation": input_config["interpolation"],
        "crop_pct": input_config["crop_pct"],
        "crop_mode": crop_mode(input_config),
    }


def check_timm_architecture(name: str, allow_non_timm: bool) -> None:
    """A fresh process with timm alone builds only the architectures timm itself registers."""
    registered_by = timm.models.model_entrypoint(name).__module__
    if not registered_by.startswith("timm.") and not allow_non_timm:
        raise SkuvisionError(
            f"model.name={name} is registered by {registered_by}, not by timm: a process with timm alone "
            f"cannot build it. Use format=onnx, or allow_non_timm=true and `import {registered_by}` before "
            "timm.create_model"
        )


def export_timm(
    cfg: DictConfig, module: Classifier, datamodule: ImageDataModule, out: Path, card: str
) -> dict:
    """The folder is written under a temporary name and checked there: only one within tolerance is kept."""
    name = module.hparams.model["name"]
    check_timm_architecture(name, bool(cfg.get("allow_non_timm")))
    with new_folder(out) as partial:
        max_diff, count = write_and_check_timm(cfg, module, datamodule, partial)
        (partial / CARD).write_text(card)
    result = {
        "timm": str(out),
        "architecture": name,
        "max_abs_diff": max_diff,
        "images": count,
        "checkpoint": str(cfg.ckpt_path),
    }
    print(
        f"timm: {out}\nmax |timm.create_model('local-dir:...') - checkpoint| = {max_diff:.2e} over "
        f"{count} real test images"
    )
    return result


def write_and_check_timm(cfg: DictConfig, module: Classifier, datamodule: ImageDataModule, out: Path):
    # A copy in the default memory layout: safetensors stores contiguous tensors only (channels_last is not).
    backbone = copy.deepcopy(module.backbone).to(memory_format=torch.contiguous_format).eval()
    extra = {}
    if module.multi_head is None:
        names = module.class_names
    else:
        names, extra["heads"] = concatenated_heads(backbone, module)
    timm.models.save_for_hf(
        backbone,
        str(out),
        # label_names (and num_classes, without which save_for_hf drops them) in pretrained_cfg too, where
        # timm puts them on loading: the folder is then what push_to_hf_hub writes for the loaded model.
        model_config={
            "label_names": names,
            "pretrained_cfg": {"num_classes": len(names), "label_names": names},
            **extra,
        },
        data_config=timm_data_config(module.input_config),
        safe_serialization=True,
    )
    # Loaded back as a user would; the checkpoint's module on the same real test images is the reference.
    loaded = timm.create_model(f"local-dir:{out.resolve()}", pretrained=True).eval()
    images = check_images(datamodule, cfg.check_images)
    to_model_input = ToModelInput(module.input_config)
    with torch.inference_mode():
        x = to_model_input(images)
        reference = module.eval()(x)
        if module.multi_head is not None:
            reference = torch.cat([reference[h.column] for h in module.heads if not h.derived], dim=1)
        max_diff = float((loaded(x) - reference).abs().max())
    if max_diff > cfg.tolerance:
        raise SkuvisionError(
            f"the exported timm model differs by {max_diff:.2e} > tolerance={cfg.tolerance}: "
            "nothing was written"
        )
    return max_diff, len(images)


def concatenated_heads(backbone: nn.Module, module: Classifier) -> tuple[list[str], list[dict]]:
    """Replaces the copied backbone's heads by one linear layer whose outputs are the trained heads' side by
    side; returns its label names (`column=class`) and config.json's "heads": each head's column, kind,
    classes, its outputs [start, end) and weight shape, or for a coarser level its source and parents.

    Not `heads.<column>.weight` tensors beside the backbone's in model.safetensors: timm loads a folder with
    `load_state_dict(strict=True)` unless the num_classes asked for differs from config.json's (timm's
    `load_pretrained`), so extra keys would make `create_model("local-dir:...", pretrained=True)` fail, and
    with config.json's num_classes=0, `num_classes=0` too. The heads are linear layers on the same pre-logit
    features, so their rows stacked are one exact linear layer that timm's format carries as any classifier:
    plain timm computes every trained head in one pass, and `num_classes=0` drops it (timm discards the
    classifier's keys) to leave the backbone. A coarser level has no weights: its probabilities are the sums
    of its source's softmax over `parents` (see skuvision.models.heads)."""
    layers = module.multi_head.layers
    trained = [h for h in module.heads if not h.derived]
    linear = nn.Linear(layers[trained[0].column].in_features, sum(len(h.classes) for h in trained))
    with torch.no_grad():
        linear.weight.copy_(torch.cat([layers[h.column].weight for h in trained]))
        linear.bias.copy_(torch.cat([layers[h.column].bias for h in trained]))
    set_classifier(backbone, linear)
    backbone.num_classes = linear.out_features  # what save_for_hf writes and timm rebuilds the model with
    names, heads, start = [], [], 0
    for card, head in zip(head_cards(module), module.heads, strict=True):
        if head.derived:
            heads.append(card | {"parents": head.parents})
            continue
        shape = list(layers[head.column].weight.shape)
        heads.append(card | {"outputs": [start, start + len(head.classes)], "weight_shape": shape})
        names += [f"{head.column}={name}" for name in head.classes]
        start += len(head.classes)
    return names, heads
