"""eval.py's report and plots, predict.py, embed.py's similarity search, and export.py's ONNX."""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import compose_cfg, quick_overrides, run_cli
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
    multiclass_precision,
)
from writers import write_image_folder

from skuvision.checkpoints import load_classifier
from skuvision.tasks import evaluate, train
from skuvision.tasks.embed import embed
from skuvision.tasks.export import export
from skuvision.tasks.predict import predict


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    write_image_folder(root, classes=("kettle", "phone", "shirt", "toaster", "watch"), per_class=16, size=40)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, photos):
    """A simple_cnn trained a little on the photo folder (so its predictions are not all one class)."""
    run = tmp_path_factory.mktemp("train")
    overrides = quick_overrides("image_folder", run) + [
        f"data.root={photos}",
        "trainer.max_epochs=3",
        "optimizer.lr=0.01",
        "input.image_size=32",
        # A training loss unlike the plain cross-entropy val/test report: both tasks must still agree.
        "label_smoothing=0.2",
        "data.balance=loss",
        "trainer.precision=32",  # as eval below and direct_logits: this CPU would pick bf16 by itself
        "tta=none",  # direct_logits is one plain pass (tests/test_ema_tta.py covers TTA)
    ]
    cfg = compose_cfg("train", overrides, run / "run")
    train(cfg)
    return Path(json.loads((run / "run" / "metrics.json").read_text())["checkpoint"])


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory, checkpoint):
    out = tmp_path_factory.mktemp("eval") / "run"
    overrides = [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "trainer.precision=32", "threads=2"]
    cfg = compose_cfg("eval", overrides, out)
    return evaluate(cfg), out


def direct_logits(checkpoint):
    """The test split's logits and labels computed without the eval task."""
    module = load_classifier(str(checkpoint)).eval()
    datamodule = instantiate(OmegaConf.create(module.hparams.data), input_config=module.input_config)
    datamodule.setup("test")
    logits, labels = [], []
    with torch.inference_mode():
        for images, y in datamodule.test_dataloader():
            logits.append(module(datamodule.to_model_input(images)).float())
            labels.append(y)
    return torch.cat(logits), torch.cat(labels)


def test_metrics_json_matches_torchmetrics(evaluation, checkpoint):
    report, out = evaluation
    written = json.loads((out / "metrics.json").read_text())
    logits, labels = direct_logits(checkpoint)
    probs = logits.softmax(1)
    k = probs.shape[1]
    expected = {
        "test/acc": multiclass_accuracy(probs, labels, k, average="micro"),
        "test/acc_top5": multiclass_accuracy(probs, labels, k, top_k=5, average="micro"),
        "test/f1_macro": multiclass_f1_score(probs, labels, k, average="macro"),
        "test/f1_weighted": multiclass_f1_score(probs, labels, k, average="weighted"),
        "test/auroc_macro": multiclass_auroc(probs, labels, k, average="macro"),
    }
    for key, value in expected.items():
        assert written[key] == pytest.approx(value.item(), abs=1e-5), key
    precision = multiclass_precision(probs, labels, k, average=None)
    for i, name in enumerate(["kettle", "phone", "shirt", "toaster", "watch"]):
        assert written["per_class"][name]["precision"] == pytest.approx(precision[i].item(), abs=1e-5)
        assert written["per_class"][name]["support"] == int((labels == i).sum())
    assert np.asarray(written["confusion_matrix"]).sum() == len(labels)
    assert 0.0 < written["test/acc"] <= 1.0


def test_train_and_eval_report_the_same_test_loss(evaluation, checkpoint):
    """The training loss smooths labels and weights classes; test/loss is plain cross-entropy in both."""
    report, _ = evaluation
    trained = json.loads((checkpoint.parents[1] / "metrics.json").read_text())
    assert checkpoint.name == "last.ckpt"  # test_ckpt's default
    assert trained["test/loss"] == pytest.approx(report["test/loss"], rel=1e-4)
    assert trained["test/acc"] == pytest.approx(report["test/acc"], abs=1e-6)
    logits, labels = direct_logits(checkpoint)
    assert report["test/loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, labels).item(), rel=1e-5
    )


def test_plots_are_valid_pngs(evaluation):
    _, out = evaluation
    for name in ("confusion_matrix.png", "roc.png", "errors.png"):
        with Image.open(out / name) as img:
            img.verify()
        with Image.open(out / name) as img:
            assert img.format == "PNG" and min(img.size) > 200


def test_predict_csv_agrees_with_eval(evaluation, checkpoint, tmp_path):
    _, out = evaluation
    with open(out / "predictions.csv") as f:
        evaluated = {row["path"]: row["predicted"] for row in csv.DictReader(f)}
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(evaluated) + "\n")
    cfg = compose_cfg(
        "predict",
        [f"ckpt_path={checkpoint}", f"input={listing}", "num_workers=0", "trainer.accelerator=cpu"],
        tmp_path / "run",
    )
    csv_path = predict(cfg)
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(evaluated)
    for row in rows:
        assert row["error"] == ""
        assert row["label_1"] == evaluated[row["path"]], row["path"]
        probs = [float(row[f"prob_{i}"]) for i in range(1, 6)]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5


def test_unreadable_file_gets_an_error_row(checkpoint, photos, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(photos / "phone", folder)
    (folder / "broken.jpg").write_text("not a jpeg")
    result = run_cli(
        "predict.py",
        [f"ckpt_path={checkpoint}", f"input={folder}", "trainer.accelerator=cpu", "num_workers=0"],
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    csv_path = next((tmp_path / "outputs").glob("*/*/predictions.csv"))
    with open(csv_path) as f:
        rows = {row["path"].split("/")[-1]: row for row in csv.DictReader(f)}
    assert rows["broken.jpg"]["error"] and rows["broken.jpg"]["label_1"] == ""
    good = [r for name, r in rows.items() if name != "broken.jpg"]
    assert len(good) == 16 and all(r["error"] == "" and r["label_1"] for r in good)


def test_retrieval_finds_duplicates_first(checkpoint, tmp_path):
    """A test split where every image has an exact copy: each one's nearest neighbour is its copy."""
    shop = tmp_path / "dup"
    write_image_folder(
        shop, classes=("kettle", "phone", "shirt", "toaster", "watch"), per_class=6, size=40, presplit=True
    )
    for image in list((shop / "test").rglob("*.*")):
        shutil.copy(image, image.with_name("copy_" + image.name))
    overrides = [
        f"ckpt_path={checkpoint}",
        "data=image_folder",
        f"data.root={shop}",
        "num_workers=0",
        "data.num_workers=0",
        "trainer.accelerator=cpu",
        "k=3",
    ]
    result = embed(compose_cfg("embed", overrides, tmp_path / "run"))
    assert result["retrieval"]["recall@1"] == 1.0
    with open(tmp_path / "run" / "neighbours.csv") as f:
        first = [row for row in csv.DictReader(f) if row["rank"] == "1"]
    for row in first:  # an identical image scores cosine 1 (others may tie with it at bf16 precision)
        assert row["item"] != row["query"]
        assert row["item"].split("/")[-2] == row["query"].split("/")[-2]
        assert float(row["cosine"]) == pytest.approx(1.0, abs=1e-3)
    saved = np.load(tmp_path / "run" / "embeddings.npz")
    assert saved["features"].shape[0] == len(saved["items"]) == 2 * 5 * 2
    np.testing.assert_allclose(np.linalg.norm(saved["features"], axis=1), 1.0, rtol=1e-5)


def test_single_query_returns_k_items(checkpoint, photos, tmp_path):
    query = next((photos / "shirt").glob("*.png"))
    overrides = [
        f"ckpt_path={checkpoint}",
        f"input={photos}",
        f"query={query}",
        "k=4",
        "num_workers=0",
        "trainer.accelerator=cpu",
    ]
    embed(compose_cfg("embed", overrides, tmp_path / "run"))
    with open(tmp_path / "run" / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4"]
    assert rows[0]["item"] == str(query) and float(rows[0]["cosine"]) == pytest.approx(1.0, abs=1e-5)


def test_onnx_matches_pytorch(checkpoint, tmp_path):
    cfg = compose_cfg(
        "export", [f"ckpt_path={checkpoint}", "check_images=24", "batch_size=8"], tmp_path / "run"
    )
    result = export(cfg)
    assert result["max_abs_diff"] <= 1e-4
    session = ort.InferenceSession(str(tmp_path / "run" / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    c, h, w = meta["input"]["input_size"]
    for batch in (1, 5):  # the batch dimension is dynamic
        out = session.run(None, {"images": np.zeros((batch, c, h, w), dtype=np.uint8)})[0]
        assert out.shape == (batch, len(meta["class_names"]))


def test_eval_without_ckpt_path_is_one_line_naming_the_key(tmp_path):
    result = run_cli("eval.py", [], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt_path is not set: give it on the command line, e.g. python eval.py "
        "ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt"
    )
    assert "Traceback" not in result.stderr and "MissingMandatoryValue" not in result.stderr


@pytest.mark.parametrize(
    ("config", "overrides", "key"),
    [
        ("predict", ["ckpt_path={checkpoint}"], "input"),
        ("train", ["data=image_folder", "trainer.accelerator=cpu"], "data.root"),
        ("shard", ["data=image_folder", "data.root={photos}"], "output"),
        ("compare", [], "sweep_dir"),
    ],
)
def test_any_missing_mandatory_key_is_one_line_with_an_example(
    checkpoint, photos, tmp_path, capsys, config, overrides, key
):
    from skuvision.tasks import compare, shard
    from skuvision.tasks.utils import run_cli as run_task

    tasks = {"predict": predict, "train": train, "shard": shard, "compare": compare}
    overrides = [o.format(checkpoint=checkpoint, photos=photos) for o in overrides]
    cfg = compose_cfg(config, overrides, tmp_path / "run")
    with pytest.raises(SystemExit) as exited:
        run_task(tasks[config], cfg)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    prefix = f"error: {key} is not set: give it on the command line, e.g. python {config}.py {key}="
    assert lines[0].startswith(prefix) and "<value>" not in lines[0], lines[0]


def test_every_mandatory_key_of_the_configs_has_an_example():
    from conftest import CONF

    from skuvision.tasks.utils import MANDATORY_EXAMPLES

    mandatory = set()
    for path in CONF.rglob("*.yaml"):
        group = path.parent.relative_to(CONF).parts
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if value.split("#")[0].strip() == "???":
                assert not name.startswith(" "), f"{path}: a nested mandatory key"
                mandatory.add(".".join([*group[:1], name]))
    assert mandatory and mandatory <= set(MANDATORY_EXAMPLES), mandatory - set(MANDATORY_EXAMPLES)
