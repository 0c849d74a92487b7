"""export.py format=timm: a folder that plain timm, in a fresh process, loads to the checkpoint's logits; and
the exports of a model with several heads (ONNX: an output per head; timm: the trained heads side by side)."""

import csv
import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from pytorch_lightning import Trainer
from safetensors.torch import load_file

from skuvision.assembly import from_checkpoint
from skuvision.data.inputs import InputFilesDataModule
from skuvision.data.transforms import ToModelInput
from skuvision.errors import SkuvisionError
from skuvision.tasks.export import check_images, check_timm_architecture, export
from skuvision.tasks.predict import predict
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides, run_alone
from tests.writers import banded_portrait, write_catalogue_table, write_image_folder

CLASSES = ("kettle", "phone", "shirt")

# Runs with timm alone: the folder's own config.json gives the preprocessing (timm's eval transform).
TIMM_ALONE = """
import json, sys
import numpy as np, timm, torch
from PIL import Image
folder, listing, out = sys.argv[1:]
torch.set_num_threads(2)
model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
data_config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**data_config)
paths = open(listing).read().split()
images = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
with torch.inference_mode():
    np.save(out, model(images).numpy())
leaked = sorted(m for m in sys.modules if m.split(".")[0] == "skuvision")
print(json.dumps({"labels": model.pretrained_cfg["label_names"], "leaked": leaked, "config": data_config}))
"""


def run_timm_alone(folder, paths, tmp_path) -> subprocess.CompletedProcess:
    """TIMM_ALONE in a fresh process without this checkout on its path: the exported folder's logits of
    `paths` to tmp_path/timm.npy, and its report on the last line of stdout."""
    listing = tmp_path / "images.txt"
    listing.write_text("\n".join(str(p) for p in paths))
    return run_alone(TIMM_ALONE, [folder, listing, tmp_path / "timm.npy"], tmp_path, {"HF_HUB_OFFLINE": "1"})


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    write_image_folder(root, classes=CLASSES, per_class=8, size=40)
    return root


@pytest.fixture(scope="module")
def resnet_checkpoint(tmp_path_factory, photos):
    """A timm architecture (resnet18, random init) trained a few steps at 32 px, with weight EMA on."""
    return resnet18_few_steps(tmp_path_factory, "image_folder", photos)


def resnet18_few_steps(tmp_path_factory, data: str, root, *extra: str):
    """resnet18 (random init) trained 2 steps at 32 px on `data` at `root`, untested: its checkpoint."""
    run = tmp_path_factory.mktemp("train")
    overrides = quick_overrides(data, run, model="resnet18") + [
        f"data.root={root}",
        *extra,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "test=false",
        "trainer.precision=32",
    ]
    train(compose_cfg("train", overrides, run / "run"))
    return sorted((run / "run" / "checkpoints").glob("*.ckpt"))[0]


def checkpoint_logits(checkpoint, paths) -> np.ndarray:
    """predict.py's logits (before its softmax): the same module, data module and Trainer, without TTA."""
    module, _ = from_checkpoint(str(checkpoint))
    module.tta = "none"
    files = InputFilesDataModule(paths, module.input_config, batch_size=8, num_workers=0)
    trainer = Trainer(
        accelerator="cpu", precision=32, logger=False, enable_checkpointing=False, enable_progress_bar=False
    )
    return torch.cat([o["outputs"] for o in trainer.predict(module, datamodule=files)]).numpy()


def test_timm_folder_loads_in_a_fresh_process_to_predicts_logits(resnet_checkpoint, photos, tmp_path):
    folder = tmp_path / "export" / "timm"
    cfg = compose_cfg(
        "export", [f"ckpt_path={resnet_checkpoint}", "format=timm", "check_images=8"], tmp_path / "export"
    )
    result = export(cfg)
    assert result["max_abs_diff"] <= 1e-5 and sorted(p.name for p in folder.iterdir()) == [
        "README.md",  # the model card
        "config.json",
        "model.safetensors",
    ]
    umask = os.umask(0)
    os.umask(umask)
    for file in folder.iterdir():  # safetensors writes 0600; shipped files get the umask's mode
        assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask, file
    assert "library_name: timm" in (folder / "README.md").read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "resnet18" and config["num_classes"] == 3
    assert config["label_names"] == list(CLASSES)
    module, _ = from_checkpoint(str(resnet_checkpoint))
    pretrained = config["pretrained_cfg"]
    assert pretrained["input_size"] == [3, 32, 32] == module.input_config["input_size"]
    for key in ("mean", "std", "interpolation", "crop_pct"):
        assert pretrained[key] == module.input_config[key]

    # timm's hub upload (push_to_hf_hub saves with save_for_hf) writes the loaded model back unchanged
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    labels = loaded.pretrained_cfg["label_names"]
    timm.models.save_for_hf(
        loaded, tmp_path / "again", model_config={"label_names": labels}, safe_serialization=True
    )
    assert json.loads((tmp_path / "again" / "config.json").read_text()) == config
    again, exported = (
        load_file(tmp_path / "again" / "model.safetensors"),
        load_file(folder / "model.safetensors"),
    )
    assert again.keys() == exported.keys() and all(torch.equal(again[k], exported[k]) for k in again)

    paths = sorted(p for p in photos.rglob("*.*"))[:20]
    fresh = run_timm_alone(folder, paths, tmp_path)
    report = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert report["leaked"] == [] and report["labels"] == list(CLASSES)
    timm_logits = np.load(tmp_path / "timm.npy")
    reference = checkpoint_logits(resnet_checkpoint, paths)
    assert timm_logits.shape == (20, 3)
    np.testing.assert_allclose(timm_logits, reference, atol=1e-5, rtol=0)

    # predict.py itself (tta=none): its probabilities are the softmax of those logits
    predicted = predict(
        compose_cfg(
            "predict",
            [
                f"ckpt_path={resnet_checkpoint}",
                f"input={tmp_path / 'images.txt'}",
                "tta=none",
                "top_k=3",
                "num_workers=0",
            ]
            + ["trainer.precision=32", "trainer.accelerator=cpu"],
            tmp_path / "predict",
        )
    )
    probs = torch.from_numpy(timm_logits).softmax(dim=1).numpy()
    with open(predicted) as f:
        for row, p in zip(csv.DictReader(f), probs, strict=True):
            assert row["label_1"] == CLASSES[int(p.argmax())]
            assert float(row["prob_1"]) == pytest.approx(float(p.max()), abs=2e-6)


def test_the_folder_carries_the_checkpoints_crop_mode_and_timm_alone_pads_as_skuvision(
    resnet_checkpoint, tmp_path
):
    """A model trained with input.crop_mode=border: config.json says border (not timm's default center), so
    plain timm fits whole portrait photos into the square and pads them as predict.py does."""
    checkpoint = torch.load(resnet_checkpoint, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"]["input_config"]["crop_mode"] = "border"
    bordered = tmp_path / "border.ckpt"
    torch.save(checkpoint, bordered)
    folder = tmp_path / "export" / "timm"
    export(
        compose_cfg("export", [f"ckpt_path={bordered}", "format=timm", "check_images=8"], tmp_path / "export")
    )
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["crop_mode"] == "border"

    paths = []
    for i in range(4):
        paths.append(tmp_path / f"portrait_{i}.png")
        banded_portrait(seed=i).save(paths[-1])
    fresh = run_timm_alone(folder, paths, tmp_path)
    assert json.loads(fresh.stdout.strip().splitlines()[-1])["config"]["crop_mode"] == "border"
    timm_logits = np.load(tmp_path / "timm.npy")
    np.testing.assert_allclose(timm_logits, checkpoint_logits(bordered, paths), atol=1e-5, rtol=0)
    assert not np.allclose(timm_logits, checkpoint_logits(resnet_checkpoint, paths), atol=1e-3)  # center


def test_an_existing_folder_is_never_overwritten(resnet_checkpoint, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    cfg = compose_cfg(
        "export",
        [f"ckpt_path={resnet_checkpoint}", "format=timm", f"output={tmp_path / 'mine'}"],
        tmp_path / "run",
    )
    with pytest.raises(SkuvisionError, match="not empty"):
        export(cfg)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


def test_a_folder_that_misses_the_tolerance_or_crashes_half_way_is_not_kept(
    resnet_checkpoint, tmp_path, monkeypatch
):
    """Written and checked under a temporary name: only a complete folder within tolerance gets the name."""
    overrides = [f"ckpt_path={resnet_checkpoint}", "format=timm", "check_images=8"]
    with pytest.raises(SkuvisionError, match=r"differs by .* nothing was written"):
        export(compose_cfg("export", overrides + ["tolerance=-1"], tmp_path / "strict"))
    assert list((tmp_path / "strict").iterdir()) == []

    def half_save_for_hf(model, save_directory, **kwargs):
        (Path(save_directory) / "config.json").write_text("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(timm.models, "save_for_hf", half_save_for_hf)
    with pytest.raises(OSError, match="No space left"):
        export(compose_cfg("export", overrides, tmp_path / "crash"))
    assert list((tmp_path / "crash").iterdir()) == []


def test_architectures_outside_timm_are_refused_unless_allowed():
    with pytest.raises(SkuvisionError, match=r"simple_cnn is registered by skuvision\.models\.simple_cnn"):
        check_timm_architecture("simple_cnn", allow_non_timm=False)
    check_timm_architecture("simple_cnn", allow_non_timm=True)
    check_timm_architecture("resnet18", allow_non_timm=False)


def test_unknown_format_is_refused(resnet_checkpoint, tmp_path):
    cfg = compose_cfg("export", [f"ckpt_path={resnet_checkpoint}", "format=tflite"], tmp_path / "run")
    with pytest.raises(SkuvisionError, match="format=tflite"):
        export(cfg)


# ---- a model with several heads (label columns, a taxonomy level read off one, a tag column) ----

COLUMNS = ["articleType", "masterCategory", "baseColour", "tags"]


@pytest.fixture(scope="module")
def heads_checkpoint(tmp_path_factory):
    """resnet18 with a head per column of the catalogue table (masterCategory read off articleType), a few
    steps at 32 px."""
    root = tmp_path_factory.mktemp("catalogue")
    manifest, _ = write_catalogue_table(root, n=120)
    return resnet18_few_steps(
        tmp_path_factory,
        "manifest",
        manifest,
        "data.label_columns=[articleType,masterCategory,baseColour]",
        "data.tag_columns=[tags]",
    )


def module_inputs(checkpoint, count: int = 12):
    """The checkpoint's module (eval) and real uint8 test images at its size, with their model input."""
    module, datamodule = from_checkpoint(str(checkpoint), split="test")
    images = check_images(datamodule, count)
    return module.eval(), images, ToModelInput(module.input_config)(images)


def test_onnx_of_several_heads_has_one_output_per_head_equal_to_the_module(heads_checkpoint, tmp_path):
    cfg = compose_cfg(
        "export", [f"ckpt_path={heads_checkpoint}", "check_images=16", "batch_size=8"], tmp_path / "run"
    )
    result = export(cfg)
    assert set(result["max_abs_diff_per_head"]) == set(COLUMNS) and result["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == COLUMNS  # head order, derived level included
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    module, images, x = module_inputs(heads_checkpoint)
    assert meta["outputs"] == COLUMNS and meta["heads"] == [
        {"column": h.column, "kind": h.kind, "classes": h.classes, "source": h.source} for h in module.heads
    ]
    assert meta["heads"][1]["source"] == "articleType" and meta["class_names"] == module.class_names
    with torch.inference_mode():
        expected = module(x)
    for batch in (1, 5, 12):  # the batch dimension is dynamic
        outputs = session.run(None, {"images": images[:batch].numpy()})
        for column, out in zip(COLUMNS, outputs, strict=True):
            np.testing.assert_allclose(out, expected[column][:batch].numpy(), atol=1e-4, rtol=0)
    # the coarser level is computed in the graph: log of the summed probabilities of its members
    article, master = session.run(["articleType", "masterCategory"], {"images": images.numpy()})
    parents = np.asarray(module.heads[1].parents)
    summed = np.stack([softmax(article)[:, parents == k].sum(1) for k in range(2)], axis=1)
    np.testing.assert_allclose(np.exp(master), summed, atol=1e-5)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_timm_folder_of_several_heads_carries_every_trained_head_and_the_backbone(heads_checkpoint, tmp_path):
    folder = tmp_path / "export" / "timm"
    cfg = compose_cfg(
        "export", [f"ckpt_path={heads_checkpoint}", "format=timm", "check_images=8"], tmp_path / "export"
    )
    assert export(cfg)["max_abs_diff"] <= 1e-5
    config = json.loads((folder / "config.json").read_text())
    module, _, x = module_inputs(heads_checkpoint)
    heads = {h["column"]: h for h in config["heads"]}
    assert [h["column"] for h in config["heads"]] == COLUMNS
    assert heads["articleType"]["outputs"] == [0, 4] and heads["baseColour"]["outputs"] == [4, 7]
    assert heads["tags"] == {
        "column": "tags", "kind": "tags", "classes": ["floral", "sticker"], "source": None, "outputs": [7, 9],
        "weight_shape": [2, 512],
    }  # fmt: skip
    assert heads["masterCategory"]["source"] == "articleType" and "outputs" not in heads["masterCategory"]
    assert heads["masterCategory"]["parents"] == module.heads[1].parents
    assert config["num_classes"] == 9 and config["label_names"][4] == "baseColour=Blue"
    weights = load_file(folder / "model.safetensors")
    assert weights["fc.weight"].shape == (9, 512) and not [k for k in weights if k.startswith("heads")]

    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    backbone = timm.create_model(f"local-dir:{folder}", pretrained=True, num_classes=0).eval()
    with torch.inference_mode():
        logits, expected = loaded(x), module(x)
        for column in ("articleType", "baseColour", "tags"):
            start, end = heads[column]["outputs"]
            torch.testing.assert_close(logits[:, start:end], expected[column], atol=1e-5, rtol=0)
        torch.testing.assert_close(backbone(x), module.embed(x), atol=1e-5, rtol=0)
