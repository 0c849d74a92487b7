"""export.py quantize=int8: an INT8 ONNX beside the fp32 one that onnxruntime alone runs in a fresh process,
agreeing with fp32 on the test split within the configured accuracy drop; a model over the limit is refused
(nothing written) or kept with a warning; serve.py's onnx backend takes it."""

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from skuvision.assembly import from_checkpoint
from skuvision.errors import SkuvisionError
from skuvision.serving.predictor import Predictor, model_card
from skuvision.tasks.export import check_images, export, images_per_second
from skuvision.tasks.quantize import card_section, write_and_check_int8
from tests.helpers import compose_cfg, run_alone
from tests.serving_fixtures import CLASSES
from tests.writers import write_image_folder

# onnxruntime and numpy only: the process fails if torch (or skuvision) was imported.
ORT_ALONE = """
import json, sys
import numpy as np, onnxruntime as ort
fp32, int8, images, labels = sys.argv[1:]
x, y = np.load(images), np.load(labels)
top1 = {}
for name, path in (("fp32", fp32), ("int8", int8)):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    top1[name] = session.run(None, {"images": x})[0].argmax(1)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "skuvision"))
assert not loaded, loaded
print(json.dumps({
    "agreement": float((top1["fp32"] == top1["int8"]).mean()),
    "fp32": float((top1["fp32"] == y).mean()),
    "int8": float((top1["int8"] == y).mean()),
}))
"""


@pytest.fixture(scope="module")
def bigger_shop(tmp_path_factory) -> Path:
    """The serve checkpoint's classes in train/val/test folders: 64 test images for the accuracy figures and
    training images to calibrate on, without training anew."""
    return write_image_folder(
        tmp_path_factory.mktemp("int8_shop"), classes=CLASSES, per_class=48, size=40, presplit=True
    )


def int8_overrides(checkpoint: Path, shop: Path, *extra: str) -> list[str]:
    return [
        f"ckpt_path={checkpoint}",
        "+data=image_folder",
        f"data.root={shop}",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
        "threads=2",
        "check_images=16",
        "batch_size=8",
        "quantize=int8",
        "int8.calibration_images=64",
        *extra,
    ]


def exported_test_split(checkpoint: Path, shop: Path, folder: Path) -> tuple[Path, Path]:
    """The test split as the exported graphs take it (uint8 at the model's size) and its labels, as .npy."""
    module, datamodule = from_checkpoint(
        str(checkpoint), {**module_data(checkpoint), "root": str(shop)}, "test"
    )
    datamodule.setup("test")
    images, labels = [], []
    for x, y in datamodule.test_dataloader():
        images.append(datamodule.to_model_input.resize_crop(x).numpy())
        labels.append(y.numpy())
    np.save(folder / "images.npy", np.concatenate(images))
    np.save(folder / "labels.npy", np.concatenate(labels))
    return folder / "images.npy", folder / "labels.npy"


def module_data(checkpoint: Path) -> dict:
    module, _ = from_checkpoint(str(checkpoint))
    return dict(module.hparams.data) | {"num_workers": 0}


@pytest.fixture(scope="module")
def int8_export(serve_checkpoint, bigger_shop, tmp_path_factory):
    run = tmp_path_factory.mktemp("int8") / "run"
    cfg = compose_cfg("export", int8_overrides(serve_checkpoint, bigger_shop, "max_accuracy_drop=3"), run)
    return export(cfg), run


def test_int8_runs_alone_and_agrees_with_fp32_within_the_drop(
    int8_export, serve_checkpoint, bigger_shop, tmp_path
):
    result, run = int8_export
    figures = json.loads((run / "model.int8.json").read_text())["int8"]
    assert figures["test_images"] == 64 and figures["calibration_images"] == 64
    assert figures["accuracy_drop_points"] <= figures["max_accuracy_drop"] == 3
    assert not figures["over_limit"]
    # really INT8: QDQ nodes, and the convolution weights stored as 8-bit integers
    graph = onnx.load(str(run / "model.int8.onnx")).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in graph.node}
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert int8_weights, "no 8-bit convolution weights in the INT8 graph"

    images, labels = exported_test_split(serve_checkpoint, bigger_shop, tmp_path)
    fresh = run_alone(
        ORT_ALONE,
        [run / "model.onnx", run / "model.int8.onnx", images, labels],
        tmp_path,
        {"OMP_NUM_THREADS": "2"},
    )
    alone = json.loads(fresh.stdout.splitlines()[-1])
    assert alone["agreement"] >= 0.9
    # the fresh process measures what export.py wrote, on the same images
    assert alone["int8"] == pytest.approx(figures["int8_accuracy"], abs=1e-9)
    assert alone["fp32"] == pytest.approx(figures["fp32_accuracy"], abs=1e-9)
    assert alone["agreement"] == pytest.approx(figures["top1_agreement"], abs=1e-9)
    assert 100 * (alone["fp32"] - alone["int8"]) <= 3
    assert alone["fp32"] > 1.5 / len(CLASSES)  # a trained model, so agreement is not agreement on noise

    card = (run / "README.md").read_text()
    assert "## INT8 model" in card and f"{figures['int8_accuracy']:.4f}" in card
    assert result["int8"]["onnx"] == str(run / "model.int8.onnx")


def test_serve_onnx_backend_serves_the_int8_model(int8_export, serve_checkpoint, bigger_shop):
    _, run = int8_export
    card = model_card(str(serve_checkpoint), "onnx", str(run / "model.int8.onnx"), tta="none")
    assert card.onnx_path == str(run / "model.int8.onnx")
    size = card.input_config["input_size"][-1]
    files = sorted((bigger_shop / "test").rglob("*.png"))[:8]
    batch = np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size))) for f in files])
    images = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
    on_int8 = Predictor(card).answer(images)
    fp32_card = model_card(str(serve_checkpoint), "onnx", str(run / "model.onnx"), tta="none")
    on_fp32 = Predictor(fp32_card).answer(images)
    top = [[a["labels"][0]["label"] for a in answers] for answers in (on_int8, on_fp32)]
    assert all(a["backend"] == "onnx" for a in on_int8)
    assert sum(x == y for x, y in zip(*top, strict=True)) >= 7


def test_int8_over_the_drop_is_refused_with_nothing_written(
    int8_export, serve_checkpoint, bigger_shop, tmp_path, monkeypatch
):
    _, run = int8_export

    def same_export(model, args, f, *rest, **kwargs):
        """The fixture's export of this checkpoint (the fp32 check still runs on it): no second trace."""
        for name in ("model.onnx", "model.onnx.data"):
            if (run / name).exists():
                shutil.copy(run / name, Path(f).with_name(Path(f).name + name.removeprefix("model.onnx")))

    monkeypatch.setattr(torch.onnx, "export", same_export)
    # a drop limit no model meets (it would have to gain a point)
    strict = int8_overrides(serve_checkpoint, bigger_shop, "max_accuracy_drop=-1", "int8.test_images=16")
    with pytest.raises(SkuvisionError, match=r"INT8 refused: .* > max_accuracy_drop=-1; nothing was written"):
        export(compose_cfg("export", strict, tmp_path / "refused"))
    left = [
        p.name for p in (tmp_path / "refused").rglob("*") if p.suffix in (".onnx", ".data", ".json", ".md")
    ]
    assert left == [] and not list((tmp_path / "refused").rglob("*partial*"))


def test_int8_over_the_drop_is_kept_with_a_loud_warning_when_asked(
    int8_export, serve_checkpoint, bigger_shop, tmp_path, capsys
):
    """The INT8 step alone on the fixture's fp32 graph (no second torch export)."""
    _, run = int8_export
    extra = ["max_accuracy_drop=-1", "int8.test_images=16", "int8.keep_over_drop=true"]
    cfg = compose_cfg("export", int8_overrides(serve_checkpoint, bigger_shop, *extra), tmp_path / "kept")
    module, datamodule = from_checkpoint(str(serve_checkpoint), cfg.data, "test")
    images = check_images(datamodule, 8)
    out = tmp_path / "kept.int8.onnx"
    figures = write_and_check_int8(
        cfg, module, datamodule, run / "model.onnx", out, images, images_per_second
    )
    assert out.is_file() and figures["over_limit"] and figures["test_images"] == 16
    assert "WARNING: the INT8 model was KEPT" in capsys.readouterr().out
    assert "Warning: kept over the limit" in card_section(figures, out)


def test_bad_int8_settings_are_one_line_errors(serve_checkpoint, bigger_shop, tmp_path):
    for extra, message in [
        ("quantize=int4", "quantize=int4: use int8"),
        ("int8.calibrate_method=best", "int8.calibrate_method=best: use one of minmax"),
        ("int8.calibration_images=0", "int8.calibration_images=0: give 1 or more"),
        ("format=timm", "quantize=int8 quantizes the ONNX graph"),
    ]:
        cfg = compose_cfg("export", int8_overrides(serve_checkpoint, bigger_shop, extra), tmp_path / extra)
        with pytest.raises(SkuvisionError, match=message):
            export(cfg)
