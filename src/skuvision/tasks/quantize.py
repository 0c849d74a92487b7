"""export.py quantize=int8: an INT8 ONNX beside the fp32 one, with its accuracy cost measured.

onnxruntime's static quantization (QDQ, per-channel weights by default) calibrated on training images fed by
the checkpoint's own data module and preprocessing, with no augmentation: the INT8 graph is the fp32 graph's,
so it takes the same uint8 images. Both graphs then run over the test split (one plain pass, no TTA): test
accuracy of each, the drop in points and the top-1 agreement go into <name>.int8.json beside the file (with
model.json's class names and input config, which serve.py checks) and into the model card. A drop over
`max_accuracy_drop` refuses the whole export, unless int8.keep_over_drop=true keeps it with a warning.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
from omegaconf import DictConfig, OmegaConf
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)

from skuvision.assembly import data_module
from skuvision.config import plain
from skuvision.data.datamodule import ImageDataModule
from skuvision.errors import SkuvisionError

log = logging.getLogger("skuvision")

CALIBRATE_METHODS = {
    "minmax": CalibrationMethod.MinMax,
    "entropy": CalibrationMethod.Entropy,
    "percentile": CalibrationMethod.Percentile,
}
QUANT_TYPES = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
QUANTIZE = ("int8",)


def int8_path(out: Path) -> Path:
    """model.onnx -> model.int8.onnx; its JSON (with_suffix) is then model.int8.json, where serve.py looks."""
    return out.with_name(f"{out.stem}.int8{out.suffix}")


def check_quantize(cfg: DictConfig) -> str | None:
    """The quantize= value and int8.* settings, checked before any work."""
    quantize = cfg.get("quantize")
    if quantize in (None, "none"):
        return None
    if quantize not in QUANTIZE:
        raise SkuvisionError(f"quantize={quantize}: use int8, or leave it out for fp32 only")
    if cfg.get("format", "onnx") != "onnx":
        raise SkuvisionError("quantize=int8 quantizes the ONNX graph: use it with format=onnx")
    settings = cfg.int8
    if settings.calibrate_method not in CALIBRATE_METHODS:
        raise SkuvisionError(
            f"int8.calibrate_method={settings.calibrate_method}: use one of {', '.join(CALIBRATE_METHODS)}"
        )
    for key in ("activation_type", "weight_type"):
        if settings[key] not in QUANT_TYPES:
            raise SkuvisionError(f"int8.{key}={settings[key]}: use one of {', '.join(QUANT_TYPES)}")
    if int(settings.calibration_images) < 1:
        raise SkuvisionError(f"int8.calibration_images={settings.calibration_images}: give 1 or more")
    return quantize


def check_one_label(quantize: str | None, multi_head: bool) -> None:
    if quantize and multi_head:
        raise SkuvisionError(
            "quantize=int8 measures the accuracy of a one-label model; this checkpoint has several heads: "
            "export it without quantize"
        )


class ImageBatches(CalibrationDataReader):
    """onnxruntime's calibration input: uint8 image batches under the graph's input name."""

    def __init__(self, batches: Iterator[np.ndarray]):
        self.batches = iter(batches)
        self.count = 0

    def get_next(self) -> dict | None:
        batch = next(self.batches, None)
        if batch is None:
            return None
        self.count += len(batch)
        return {"images": batch}


def calibration_data(data: DictConfig | dict, input_config: dict, count: int) -> ImageDataModule:
    """A data module whose predict split is a seeded, class-stratified `count` of the training split, with
    the eval preprocessing (no augmentation): what the deployed model is fed."""
    data_cfg = plain(data) if isinstance(data, DictConfig) else dict(data)
    data_cfg |= {"augment": None, "subset": int(count), "cache": False, "balance": "none"}
    return data_module(OmegaConf.create(data_cfg), input_config, split="train")


def model_batches(datamodule: ImageDataModule, loader) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(uint8 images at the model's size, labels) per batch, as export's check images are made."""
    for images, labels in loader:
        yield datamodule.to_model_input.resize_crop(images).numpy(), np.asarray(labels)


def quantize_options(settings: DictConfig) -> dict:
    """quantize_static's arguments from int8.* (every choice onnxruntime offers that we expose)."""
    extra = {"ActivationSymmetric": bool(settings.activation_symmetric)}
    if settings.get("extra_options"):
        extra |= dict(plain(settings.extra_options))
    return {
        "quant_format": QuantFormat.QDQ,
        "per_channel": bool(settings.per_channel),
        "reduce_range": bool(settings.reduce_range),
        "activation_type": QUANT_TYPES[settings.activation_type],
        "weight_type": QUANT_TYPES[settings.weight_type],
        "calibrate_method": CALIBRATE_METHODS[settings.calibrate_method],
        "nodes_to_exclude": list(settings.nodes_to_exclude or []) or None,
        "op_types_to_quantize": list(settings.op_types or []) or None,
        "extra_options": extra,
    }


def write_int8(fp32: Path, out: Path, settings: DictConfig, calibration: ImageBatches) -> dict:
    """fp32 ONNX -> INT8 ONNX at `out` (one file), pre-processed first where int8.preprocess says."""
    source = fp32
    with tempfile.TemporaryDirectory(prefix="skuvision-int8-") as scratch:
        if settings.preprocess:
            # shape inference and graph optimization (BatchNorm folded, ...) before calibration
            source = Path(scratch) / "preprocessed.onnx"
            try:
                quant_pre_process(str(fp32), str(source), skip_symbolic_shape=False)
            except Exception as err:  # a graph symbolic shape inference cannot follow: say so, go on
                log.warning("int8.preprocess: quant_pre_process failed (%s); quantized without it", err)
                source = fp32
        started = time.perf_counter()
        try:
            quantize_static(str(source), str(out), calibration, **quantize_options(settings))
        except Exception as err:
            raise SkuvisionError(f"INT8 quantization failed: {str(err).splitlines()[0]}") from err
    return {"calibration_images": calibration.count, "quantize_seconds": time.perf_counter() - started}


def session(path: Path, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def compare_on_test(
    fp32: ort.InferenceSession, int8: ort.InferenceSession, datamodule: ImageDataModule, limit: int | None
) -> dict:
    """Top-1 of both graphs over the test split (the first `limit` images, or all): accuracy of each, the drop
    in points and how often they agree."""
    datamodule.setup("test")
    top1 = {"fp32": [], "int8": []}
    labels = []
    seen = 0
    for images, y in model_batches(datamodule, datamodule.test_dataloader()):
        if limit is not None:
            images, y = images[: limit - seen], y[: limit - seen]
        top1["fp32"].append(fp32.run(None, {"images": images})[0].argmax(1))
        top1["int8"].append(int8.run(None, {"images": images})[0].argmax(1))
        labels.append(y)
        seen += len(y)
        if limit is not None and seen >= limit:
            break
    if not seen:
        raise SkuvisionError("quantize=int8: the test split has no images to measure the INT8 model on")
    truth = np.concatenate(labels)
    pred = {k: np.concatenate(v) for k, v in top1.items()}
    accuracy = {k: float((v == truth).mean()) for k, v in pred.items()}
    return {
        "test_images": int(seen),
        "fp32_accuracy": accuracy["fp32"],
        "int8_accuracy": accuracy["int8"],
        "accuracy_drop_points": 100 * (accuracy["fp32"] - accuracy["int8"]),
        "top1_agreement": float((pred["fp32"] == pred["int8"]).mean()),
    }


def model_bytes(path: Path) -> int:
    """The graph file and its external weights (`<name>.data`, torch's exporter), where there are some."""
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def write_and_check_int8(
    cfg: DictConfig,
    module,
    test_data: ImageDataModule,
    fp32: Path,
    out: Path,
    check_images,
    images_per_second: Callable,
) -> dict:
    """Quantizes `fp32` to `out` and measures it (img/s with the fp32 figure's own timer); refuses (raises)
    over the accuracy limit unless told to keep it. Returns the figures <name>.int8.json holds."""
    settings = cfg.int8
    calibration_dm = calibration_data(
        cfg.get("data") or module.hparams.data, module.input_config, settings.calibration_images
    )
    calibration_dm.setup("predict")
    reader = ImageBatches(
        images for images, _ in model_batches(calibration_dm, calibration_dm.predict_dataloader())
    )
    written = write_int8(fp32, out, settings, reader)
    limit = settings.get("test_images")
    figures = compare_on_test(session(fp32), session(out), test_data, int(limit) if limit else None)
    int8_session = session(out)
    speed = images_per_second(
        lambda x: int8_session.run(None, {"images": x.numpy()}), check_images, cfg.batch_size
    )
    limit_points = float(cfg.max_accuracy_drop)
    over = figures["accuracy_drop_points"] > limit_points
    result = {
        **figures,
        **written,
        "max_accuracy_drop": limit_points,
        "over_limit": over,
        "int8_img_per_s": speed,
        "fp32_bytes": model_bytes(fp32),
        "int8_bytes": model_bytes(out),
        "settings": {k: v for k, v in plain(settings).items() if k != "keep_over_drop"},
        "tta": "none (one plain pass, both graphs)",
    }
    line = (
        f"INT8: test accuracy {figures['int8_accuracy']:.2%} vs fp32 ONNX {figures['fp32_accuracy']:.2%} "
        f"({figures['accuracy_drop_points']:+.2f} points drop, max_accuracy_drop={limit_points:g}), top-1 "
        f"agreement {figures['top1_agreement']:.2%} over {figures['test_images']} test images"
    )
    print(line)
    if over and not settings.keep_over_drop:
        raise SkuvisionError(
            f"INT8 refused: its test accuracy drops {figures['accuracy_drop_points']:.2f} points > "
            f"max_accuracy_drop={limit_points:g}; nothing was written. Try int8.calibrate_method=entropy or "
            "percentile, int8.nodes_to_exclude=[...], raise max_accuracy_drop, or keep it with "
            "int8.keep_over_drop=true"
        )
    if over:
        warning = (
            f"WARNING: the INT8 model was KEPT although its test accuracy drops "
            f"{figures['accuracy_drop_points']:.2f} points > max_accuracy_drop={limit_points:g} "
            "(int8.keep_over_drop=true)"
        )
        log.warning(warning)
        print("!" * 20 + "\n" + warning + "\n" + "!" * 20)
    return result


def card_section(result: dict, out: Path) -> str:
    """The model card's INT8 section."""
    settings = result["settings"]
    how = (
        f"onnxruntime static quantization, QDQ, {'per-channel' if settings['per_channel'] else 'per-tensor'} "
        f"weights ({settings['weight_type']}), {settings['activation_type']} activations, "
        f"{settings['calibrate_method']} calibration on {result['calibration_images']} training images"
    )
    warning = (
        f"\n**Warning: kept over the limit** (drop {result['accuracy_drop_points']:.2f} points > "
        f"max_accuracy_drop={result['max_accuracy_drop']:g}).\n"
        if result["over_limit"]
        else ""
    )
    return (
        f"## INT8 model\n\n`{out.name}`: {how}. Same input as the fp32 graph (uint8 images). Test split, one "
        f"plain pass, {result['test_images']} images:\n\n"
        "| | fp32 ONNX | INT8 ONNX |\n|---|---|---|\n"
        f"| test accuracy | {result['fp32_accuracy']:.4f} | {result['int8_accuracy']:.4f} |\n"
        f"| size (bytes) | {result['fp32_bytes']} | {result['int8_bytes']} |\n\n"
        f"Accuracy drop {result['accuracy_drop_points']:.2f} points (limit {result['max_accuracy_drop']:g}); "
        f"top-1 agreement with fp32 {result['top1_agreement']:.2%}. `{out.with_suffix('.json').name}` holds "
        "these figures.\n" + warning
    )
