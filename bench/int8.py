"""make bench rows for export.py quantize=int8: the INT8 ONNX beside the fp32 ONNX and the PyTorch module of
the same checkpoint, in the same run: test accuracy, images/s at batch 1 and 32, model size; for simple_cnn,
resnet18 (random init) and tf_efficientnet_lite0 (the real ImageNet weights of OFFLINE.md; MobileNet-class,
depthwise convolutions), each trained a little on real Fashion-MNIST. Then the depthwise trap: lite0 under
each choice onnxruntime offers (per-tensor, reduce_range, Entropy / Percentile calibration, symmetric int8
activations, bias kept in fp32, depthwise convolutions left in fp32), against the fp32 graph.

Alone: python -m bench.int8 [--quick]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import onnx
import torch
from omegaconf import OmegaConf
from onnxruntime.quantization import quant_pre_process

from bench import THREADS
from bench.table import run_section
from skuvision.assembly import from_checkpoint
from skuvision.config import compose_config
from skuvision.tasks.export import Deployable, check_images, export, images_per_second
from skuvision.tasks.quantize import (
    ImageBatches,
    calibration_data,
    compare_on_test,
    model_batches,
    session,
    write_int8,
)
from skuvision.tasks.train import train

# model, image size, training images (full, quick), epochs
MODELS = (
    ("simple_cnn", 28, (12000, 2000), 2),
    ("resnet18", 64, (6000, 1200), 1),
    ("tf_efficientnet_lite0", 96, (6000, 1200), 1),
)
DEPTHWISE_MODEL = "tf_efficientnet_lite0"


def trained(workdir: Path, model: str, size: int, subset: int, epochs: int) -> Path:
    run = workdir / f"train-{model}"
    overrides = [
        f"model={model}",
        "data=fashion_mnist",
        "data.download=false",
        f"data.subset={subset}",
        "data.batch_size=64",
        f"input.image_size={size}",
        f"trainer.max_epochs={epochs}",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "callbacks.progress_bar=null",
        "trainer.enable_model_summary=false",
        "tta=none",
        "test=false",
        f"threads={THREADS}",
    ]
    if model == "resnet18":
        overrides.append("model.pretrained=false")  # no ImageNet weights for it offline
    train(compose_config("train", overrides, run))
    return sorted((run / "checkpoints").glob("best-*.ckpt"))[-1]


def exported(workdir: Path, ckpt: Path, calibration_images: int) -> Path:
    """export.py quantize=int8 with the defaults, the limit lifted so every model is measured."""
    out = workdir / f"export-{ckpt.parent.parent.name}"
    overrides = [
        f"ckpt_path={ckpt}",
        "quantize=int8",
        f"int8.calibration_images={calibration_images}",
        "max_accuracy_drop=100",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        f"threads={THREADS}",
        "check_images=32",
    ]
    export(compose_config("export", overrides, out))
    return out


def torch_accuracy(ckpt: Path) -> float:
    """The checkpoint's module (uint8 in, as the graphs) over the same test split, one plain pass."""
    module, datamodule = from_checkpoint(str(ckpt), split="test")
    model = Deployable(module).eval()
    datamodule.setup("test")
    right = seen = 0
    with torch.inference_mode():
        for images, labels in model_batches(datamodule, datamodule.test_dataloader()):
            right += int((model(torch.from_numpy(images)).argmax(1).numpy() == labels).sum())
            seen += len(labels)
    return right / seen


def speeds(ckpt: Path, folder: Path, count: int) -> dict:
    """images/s at batch 1 and 32 of torch, fp32 ONNX and INT8 ONNX on the same real test images."""
    module, datamodule = from_checkpoint(str(ckpt), split="test")
    images = check_images(datamodule, count)
    model = Deployable(module).eval()
    runs = {"torch": model}
    for name, path in (("fp32", folder / "model.onnx"), ("int8", folder / "model.int8.onnx")):
        ort_session = session(path, THREADS)
        runs[name] = lambda x, s=ort_session: s.run(None, {"images": x.numpy()})
    out = {}
    with torch.inference_mode():
        for batch in (1, 32):
            for name, run in runs.items():
                out[(name, batch)] = images_per_second(run, images, batch)
    return out


def model_rows(workdir: Path, model: str, size: int, subset: int, epochs: int, quick: bool):
    ckpt = trained(workdir, model, size, subset, epochs)
    folder = exported(workdir, ckpt, 64 if quick else 256)
    figures = json.loads((folder / "model.int8.json").read_text())["int8"]
    acc_torch = torch_accuracy(ckpt)
    speed = speeds(ckpt, folder, 32 if quick else 128)
    f32, i8 = figures["fp32_accuracy"], figures["int8_accuracy"]
    rows = [
        (
            f"INT8 {model} ({size} px): test accuracy",
            f"{100 * i8:.2f} % (top-1 agreement {100 * figures['top1_agreement']:.1f} %)",
            f"fp32 ONNX {100 * f32:.2f} %, torch {100 * acc_torch:.2f} %",
            f"{100 * (i8 - f32):+.2f} points",
            "within 1 point",
        )
    ]
    for batch in (1, 32):
        rows.append(
            (
                f"INT8 {model}: images/s at batch {batch}",
                f"{speed[('int8', batch)]:.0f}",
                f"fp32 ONNX {speed[('fp32', batch)]:.0f}, torch {speed[('torch', batch)]:.0f}",
                f"{speed[('int8', batch)] / speed[('fp32', batch)]:.2f}x",
                "higher",
            )
        )
    rows.append(
        (
            f"INT8 {model}: model size",
            f"{figures['int8_bytes'] / 1e6:.2f} MB",
            f"fp32 ONNX {figures['fp32_bytes'] / 1e6:.2f} MB",
            f"{figures['int8_bytes'] / figures['fp32_bytes']:.2f}x",
            "lower",
        )
    )
    return rows, ckpt, folder, figures["test_images"]


VARIANTS = (
    ("defaults (MinMax, per-channel, uint8 activations)", {}),
    ("per-tensor weights", {"per_channel": False}),
    ("reduce_range (7-bit weights)", {"reduce_range": True}),
    ("Entropy calibration", {"calibrate_method": "entropy"}),
    ("Percentile calibration (99.999)", {"calibrate_method": "percentile"}),
    ("int8 symmetric activations", {"activation_type": "int8", "activation_symmetric": True}),
    ("bias kept in fp32 (QuantizeBias off)", {"extra_options": {"QuantizeBias": False}}),
    ("depthwise convolutions kept in fp32", {"nodes_to_exclude": "depthwise"}),
    ("defaults without quant_pre_process", {"raw": True}),
)


def depthwise_nodes(path: Path) -> list[str]:
    """The Conv nodes whose group equals their input channels' count (group > 1 here)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return [
        n.name
        for n in graph.node
        if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
    ]


def ort_speed(path: Path, images: torch.Tensor) -> float:
    ort_session = session(path, THREADS)
    return images_per_second(lambda x: ort_session.run(None, {"images": x.numpy()}), images, 32)


def depthwise_rows(workdir: Path, ckpt: Path, folder: Path, quick: bool) -> tuple[list, list[str]]:
    """lite0 quantized under each choice, from the same pre-processed fp32 graph; test accuracy vs fp32."""
    base = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "export.yaml").int8
    module, test_data = from_checkpoint(str(ckpt), split="test")
    images = check_images(test_data, 64)
    fp32_speed = ort_speed(folder / "model.onnx", images)
    pre = workdir / "lite0-preprocessed.onnx"
    quant_pre_process(str(folder / "model.onnx"), str(pre))
    rows, notes = [], []
    limit = 500 if quick else None
    count = 64 if quick else 256
    for label, change in VARIANTS:
        settings = OmegaConf.merge(base, {"preprocess": False, "calibration_images": count})
        change = dict(change)
        source = folder / "model.onnx" if change.pop("raw", False) else pre
        if change.get("nodes_to_exclude") == "depthwise":
            change = {"nodes_to_exclude": depthwise_nodes(pre)}
            notes.append(f"lite0: {len(change['nodes_to_exclude'])} depthwise Conv nodes kept in fp32.")
        settings = OmegaConf.merge(settings, change)
        calibration = calibration_data(module.hparams.data, module.input_config, count)
        calibration.setup("predict")
        reader = ImageBatches(im for im, _ in model_batches(calibration, calibration.predict_dataloader()))
        out = workdir / f"lite0-{re.sub(r'[^a-z0-9]+', '-', label.lower())}.onnx"
        write_int8(source, out, settings, reader)
        figures = compare_on_test(session(pre, THREADS), session(out, THREADS), test_data, limit)
        speed = ort_speed(out, images)
        rows.append(
            (
                f"INT8 lite0, {label}: test accuracy",
                f"{100 * figures['int8_accuracy']:.2f} % (agrees {100 * figures['top1_agreement']:.1f} %), "
                f"{speed:.0f} img/s",
                f"fp32 ONNX {100 * figures['fp32_accuracy']:.2f} %, {fp32_speed:.0f} img/s (batch 32)",
                f"{-figures['accuracy_drop_points']:+.2f} points, {speed / fp32_speed:.2f}x",
                "within 1 point",
            )
        )
    return rows, notes


def cpu_flags() -> str:
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags |= set(line.split(":", 1)[1].split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")
    return ", ".join(f for f in wanted if f in flags) or "none of avx2 / avx512 / VNNI / AMX"


def bench_rows(workdir: Path, quick: bool = False) -> tuple[list[tuple], list[str]]:
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(THREADS)
    rows, notes = [], []
    for model, size, subsets, epochs in MODELS:
        model_out, ckpt, folder, tested = model_rows(
            workdir, model, size, subsets[1] if quick else subsets[0], epochs, quick
        )
        rows += model_out
        notes.append(f"INT8 {model}: {tested} test images, trained {epochs} epoch(s) on Fashion-MNIST.")
        if model == DEPTHWISE_MODEL:
            trap_rows, trap_notes = depthwise_rows(workdir, ckpt, folder, quick)
            rows += trap_rows
            notes += trap_notes
    notes.append(
        f"INT8 speed: onnxruntime CPU provider, {THREADS} threads. This CPU reports {cpu_flags()}: VNNI (and "
        "AMX where listed) run INT8 dot products in hardware, so these speed-ups are an upper bound for an "
        "edge CPU without them. Accuracy: one plain pass (no TTA) over the test split, all three on the "
        "same images; calibration on training images with the eval preprocessing."
    )
    return rows, notes


if __name__ == "__main__":
    run_section(bench_rows, __doc__.splitlines()[0])
