"""export(cfg): a checkpoint -> ONNX with a dynamic batch, checked against PyTorch with onnxruntime.

The exported graph takes uint8 images (N, C, H, W) at the model's input size and does the scaling and
normalization itself, so a deployment only resizes and center-crops. model.json beside it holds the class
names and the input config.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from omegaconf import DictConfig
from torch import nn

from skuvision.data.datamodule import ImageDataModule
from skuvision.data.transforms import ToModelInput
from skuvision.errors import SkuvisionError
from skuvision.models.classifier import Classifier
from skuvision.tasks.assembly import from_checkpoint
from skuvision.tasks.utils import set_threads, write_json

log = logging.getLogger("skuvision")


class Deployable(nn.Module):
    """uint8 images at the model's size -> logits: normalization plus the backbone."""

    def __init__(self, module: Classifier):
        super().__init__()
        self.to_model_input = ToModelInput(module.input_config)
        self.backbone = module.backbone

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.to_model_input(images))


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
    run(images[:batch_size])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(0, len(images), batch_size):
            run(images[i : i + batch_size])
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def export(cfg: DictConfig) -> dict:
    set_threads(cfg.get("threads"))
    module, datamodule = from_checkpoint(cfg.ckpt_path, cfg.get("data"), split="test")
    model = Deployable(module).eval()
    out = Path(cfg.output) if cfg.get("output") else Path(cfg.paths.output_dir) / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    images = check_images(datamodule, cfg.check_images)
    try:
        torch.onnx.export(
            model,
            (images[:2],),
            str(out),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
            opset_version=cfg.opset,
            dynamo=True,
        )
    except Exception as err:  # the exporter's errors are long; the first line says what failed
        raise SkuvisionError(
            f"ONNX export of {module.hparams.model['name']} failed: {str(err).splitlines()[0]}"
        ) from err
    write_json(
        out.with_suffix(".json"),
        {
            "class_names": module.class_names,
            "input": module.input_config,
            "input_dtype": "uint8",
            "checkpoint": str(cfg.ckpt_path),
        },
    )
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    with torch.inference_mode():
        reference = model(images).numpy()
    onnx_logits = np.concatenate(
        [
            session.run(None, {"images": images[i : i + cfg.batch_size].numpy()})[0]
            for i in range(0, len(images), cfg.batch_size)
        ]
    )
    max_diff = float(np.abs(onnx_logits - reference).max())
    with torch.inference_mode():
        torch_speed = images_per_second(model, images, cfg.batch_size)
    onnx_speed = images_per_second(lambda x: session.run(None, {"images": x.numpy()}), images, cfg.batch_size)
    result = {
        "onnx": str(out),
        "max_abs_diff": max_diff,
        "images": len(images),
        "pytorch_img_per_s": torch_speed,
        "onnxruntime_img_per_s": onnx_speed,
    }
    write_json(out.with_name("export_check.json"), result)
    print(
        f"ONNX: {out}\nmax |onnxruntime - pytorch| = {max_diff:.2e} over {len(images)} real test images\n"
        f"img/s: pytorch {torch_speed:.0f}, onnxruntime {onnx_speed:.0f} (batch {cfg.batch_size}, CPU)"
    )
    if max_diff > cfg.tolerance:
        raise SkuvisionError(
            f"onnxruntime differs from PyTorch by {max_diff:.2e} > tolerance={cfg.tolerance}"
        )
    return result
