"""eval.py's report and plots, predict.py, embed.py's similarity search, and export.py's ONNX."""

import csv
import json
import shutil
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multiclass_auroc,
    multiclass_f1_score,
    multiclass_precision,
)

from skuvision.checkpoints import load_classifier
from skuvision.errors import SkuvisionError
from skuvision.index import CatalogueIndex
from skuvision.tasks.compare import write_leaderboard
from skuvision.tasks.embed import embed
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.export import export
from skuvision.tasks.predict import predict
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides, run_cli
from tests.writers import write_image_folder


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


def test_errors_page_shows_every_mistake_most_confident_first(evaluation):
    from tests.pages import read_page

    _, out = evaluation
    with open(out / "predictions.csv") as f:
        wrong = [row for row in csv.DictReader(f) if row["true"] != row["predicted"]]
    assert wrong
    page = read_page(out / "errors.html")
    assert [t.name for t in page.tiles] == [
        row["path"] for row in sorted(wrong, key=lambda r: -float(r["confidence"]))
    ]
    for tile, row in zip(page.tiles, sorted(wrong, key=lambda r: -float(r["confidence"])), strict=True):
        truth, said, *_ = tile.cells
        assert truth[:2] == ["true", row["true"]] and said[1] == row["predicted"]
        assert said[2] == f"{float(row['confidence']):.1%}" and len(tile.images) == 1
    assert f"{len(wrong)} of" in "".join(page.text)


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
    """In this process: test_predict_cli_into_an_earlier_run_folder_changes_nothing runs predict.py."""
    folder = tmp_path / "new"
    shutil.copytree(photos / "phone", folder)
    (folder / "broken.jpg").write_text("not a jpeg")
    overrides = [f"ckpt_path={checkpoint}", f"input={folder}", "trainer.accelerator=cpu", "num_workers=0"]
    csv_path = predict(compose_cfg("predict", overrides, tmp_path / "run"))
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


# ---- earlier results are never replaced, and nothing is left half-written ----

# File names a spreadsheet would run as formulas (relative to input=), and awkward ones that must still parse.
FORMULA_NAMES = [
    '=HYPERLINK("evil","click").png',
    "+SUM(1,2).png",
    "-x.png",
    "@x.png",
    "\tx.png",
    "\rx.png",
    "'quoted.png",
]
AWKWARD_NAMES = ['a, "b"\nc.png', "čaj ☕ 茶.png"]


def snapshot(folder: Path) -> dict:
    """Every entry under `folder`: its bytes and mtime, or None for a folder (what a refused run keeps)."""
    return {
        p: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None
        for p in sorted(Path(folder).rglob("*"))
    }


def one_line_refusal(run, match: str, says_nothing_written: bool = True) -> str:
    with pytest.raises(SkuvisionError, match=match) as refused:
        run()
    message = str(refused.value)
    assert "\n" not in message and ("nothing was written" in message or not says_nothing_written), message
    return message


def predict_cfg(checkpoint, input, folder, extra=()):
    overrides = [f"ckpt_path={checkpoint}", f"input={input}", "num_workers=0", "trainer.accelerator=cpu"]
    return compose_cfg("predict", overrides + list(extra), folder)


def embed_cfg(checkpoint, input, folder, extra=()):
    overrides = [f"ckpt_path={checkpoint}", f"input={input}", "num_workers=0", "trainer.accelerator=cpu"]
    return compose_cfg("embed", overrides + ["k=2", *extra], folder)


class FailingCsvWriter:
    """csv.writer that writes `rows` rows, then fails as a full disk would."""

    def __init__(self, f, rows: int):
        self.writer, self.left = csv_writer(f), rows

    def writerow(self, row):
        if self.left == 0:
            raise OSError(28, "No space left on device")
        self.left -= 1
        return self.writer.writerow(row)

    def writerows(self, rows):
        for row in rows:
            self.writerow(row)


csv_writer = csv.writer


def test_second_eval_into_the_same_folder_changes_nothing(evaluation, checkpoint):
    _, out = evaluation
    before = snapshot(out)
    overrides = [f"ckpt_path={checkpoint}", "trainer.accelerator=cpu", "trainer.precision=32", "threads=2"]
    message = one_line_refusal(lambda: evaluate(compose_cfg("eval", overrides, out)), "metrics.json exists")
    assert "new run folder" in message
    assert snapshot(out) == before


def test_second_predict_into_the_same_folder_or_output_changes_nothing(checkpoint, photos, tmp_path):
    first = predict(predict_cfg(checkpoint, photos / "phone", tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    one_line_refusal(
        lambda: predict(predict_cfg(checkpoint, photos / "kettle", tmp_path / "run")),
        "predictions.csv exists",
    )
    message = one_line_refusal(
        lambda: predict(predict_cfg(checkpoint, photos / "kettle", tmp_path / "other", [f"output={first}"])),
        "predictions.csv exists",
    )
    assert "another output=" in message
    assert snapshot(tmp_path / "run") == before


def test_a_crash_while_writing_predictions_leaves_no_file(checkpoint, photos, tmp_path, monkeypatch):
    monkeypatch.setattr(csv, "writer", lambda f, *a, **k: FailingCsvWriter(f, rows=3))
    with pytest.raises(OSError, match="No space left"):
        predict(predict_cfg(checkpoint, photos / "phone", tmp_path / "run"))
    assert list((tmp_path / "run").iterdir()) == []


def test_dangling_and_looping_links_get_their_own_error_rows(checkpoint, photos, tmp_path):
    folder = tmp_path / "new"
    shutil.copytree(photos / "phone", folder)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "ping.jpg").symlink_to(folder / "pong.jpg")
    (folder / "pong.jpg").symlink_to(folder / "ping.jpg")
    (folder / "album.png").symlink_to(photos / "kettle")  # a link to a folder is not an image file
    with open(predict(predict_cfg(checkpoint, folder, tmp_path / "run"))) as f:
        rows = {row["path"].split("/")[-1]: row for row in csv.DictReader(f)}
    assert "album.png" not in rows
    assert "No such file" in rows["dangling.png"]["error"] and "gone.png" in rows["dangling.png"]["error"]
    for name in ("loop.png", "ping.jpg", "pong.jpg"):
        assert "symbolic link" in rows[name]["error"] and "levels of symbolic links" in rows[name]["error"]
        assert rows[name]["label_1"] == ""
    good = [r for name, r in rows.items() if not name.startswith(("dangling", "loop", "ping", "pong"))]
    assert len(good) == 16 and all(r["error"] == "" and r["label_1"] for r in good)


@pytest.fixture
def tricky_names(photos, tmp_path, monkeypatch):
    """A folder of real images under formula-like and awkward names, as the working folder (input=.)."""
    folder = tmp_path / "tricky"
    folder.mkdir()
    names = FORMULA_NAMES + AWKWARD_NAMES
    sources = sorted((photos / "shirt").iterdir())[: len(names)]  # PNGs and JPEGs: read by their content
    for name, source in zip(names, sources, strict=True):
        shutil.copy(source, folder / name)
    monkeypatch.chdir(folder)
    return sorted(FORMULA_NAMES + AWKWARD_NAMES)


def quoted(name: str) -> str:
    return "'" + name if name.startswith(("=", "+", "-", "@", "\t", "\r", "'")) else name


def test_predictions_csv_quotes_formula_names_and_parses(checkpoint, tricky_names, tmp_path):
    out = predict(predict_cfg(checkpoint, ".", tmp_path / "run"))
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["path"] for r in rows) == sorted(quoted(n) for n in tricky_names)
    assert all(r["error"] == "" and r["label_1"] for r in rows)  # every file was read under its real name
    table = pd.read_csv(out, keep_default_na=False)
    assert sorted(table["path"]) == sorted(quoted(n) for n in tricky_names)


def test_index_and_neighbours_of_formula_names(checkpoint, tricky_names, tmp_path):
    """neighbours.csv quotes them; the index's items.csv is quoted too and reads back to the exact names."""
    embed(embed_cfg(checkpoint, ".", tmp_path / "run"))
    assert sorted(CatalogueIndex.load(tmp_path / "run" / "index").items) == tricky_names
    with open(tmp_path / "run" / "index" / "items.csv", newline="") as f:
        assert sorted(r["item"] for r in csv.DictReader(f)) == sorted(quoted(n) for n in tricky_names)
    with open(tmp_path / "run" / "neighbours.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["query"] for r in rows} == {quoted(n) for n in tricky_names} >= {r["item"] for r in rows}
    assert sorted(np.load(tmp_path / "run" / "embeddings.npz")["items"].tolist()) == tricky_names


def test_second_embed_into_the_same_folder_changes_nothing(checkpoint, photos, tmp_path):
    """The earlier embeddings.npz included: it used to be replaced before the index was refused."""
    embed(embed_cfg(checkpoint, photos / "phone", tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    assert tmp_path / "run" / "index" / "items.csv" in before
    one_line_refusal(
        lambda: embed(embed_cfg(checkpoint, photos / "kettle", tmp_path / "run")), "embeddings.npz exists"
    )
    assert snapshot(tmp_path / "run") == before


def half_savez(file, *args, **kwargs):
    Path(file).write_bytes(b"PK\x03\x04 half an archive")
    raise OSError(28, "No space left on device")


def half_write_index(index, name):
    Path(name).write_bytes(b"IxF2 half an index")
    raise OSError(28, "No space left on device")


@pytest.mark.parametrize("failing", ["embeddings", "index"])
def test_a_crash_while_embedding_leaves_no_half_written_result(
    failing, checkpoint, photos, tmp_path, monkeypatch
):
    if failing == "embeddings":
        monkeypatch.setattr(np, "savez", half_savez)
    else:
        monkeypatch.setattr(faiss, "write_index", half_write_index)
    with pytest.raises(OSError, match="No space left"):
        embed(embed_cfg(checkpoint, photos / "phone", tmp_path / "run"))
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ([] if failing == "embeddings" else ["embeddings.npz"])  # complete, from this run
    if left:
        assert len(np.load(tmp_path / "run" / "embeddings.npz")["items"]) == 16


def test_embedding_one_image_is_refused_in_one_line(checkpoint, photos, tmp_path):
    image = sorted((photos / "phone").glob("*.png"))[0]
    message = one_line_refusal(
        lambda: embed(embed_cfg(checkpoint, image, tmp_path / "run")), "one image has no neighbours", False
    )
    assert str(image) in message and "query=" in message
    assert list((tmp_path / "run").iterdir()) == []
    # one catalogue image searched with a query is a sensible request: its one neighbour
    query = sorted((photos / "kettle").glob("*.png"))[0]
    embed(embed_cfg(checkpoint, image, tmp_path / "query", [f"query={query}"]))
    with open(tmp_path / "query" / "neighbours.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["query"], r["rank"], r["item"]) for r in rows] == [(str(query), "1", str(image))]


def test_second_export_into_the_same_folder_or_output_changes_nothing(checkpoint, tmp_path):
    overrides = [f"ckpt_path={checkpoint}", "check_images=8", "batch_size=8"]
    export(compose_cfg("export", overrides, tmp_path / "run"))
    before = snapshot(tmp_path / "run")
    results = {"model.onnx", "model.json", "export_check.json", "README.md"}
    assert results <= {p.name for p in before} <= results | {"model.onnx.data"}  # its external weights
    one_line_refusal(lambda: export(compose_cfg("export", overrides, tmp_path / "run")), "model.onnx exists")
    output = [f"output={tmp_path / 'run' / 'model.onnx'}"]
    message = one_line_refusal(
        lambda: export(compose_cfg("export", overrides + output, tmp_path / "other")), "model.onnx exists"
    )
    assert "another output=" in message
    assert snapshot(tmp_path / "run") == before


def test_a_card_without_test_figures_says_they_were_not_measured(checkpoint, tmp_path, monkeypatch):
    import skuvision.tasks.export as export_task

    overrides = [f"ckpt_path={checkpoint}", "check_images=8", "batch_size=8"]
    one_line_refusal(
        lambda: export(compose_cfg("export", [*overrides, "card.test_figures=sometimes"], tmp_path / "bad")),
        "card.test_figures=sometimes: give true",
        says_nothing_written=False,
    )
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())

    def no_pass(*args):
        raise AssertionError("card.test_figures=false must not measure the test split")

    monkeypatch.setattr(export_task, "test_figures", no_pass)
    export(compose_cfg("export", [*overrides, "card.test_figures=false"], tmp_path / "run"))
    card = (tmp_path / "run" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---")[1])
    assert "model-index" not in meta and "metrics" not in meta  # no results rather than made-up ones
    figures = card.split("## Test figures")[1].split("##")[0]
    assert "Not measured" in figures and "card.test_figures=false" in figures and "|" not in figures
    assert "test images" not in card.split("## Known limits")[1]


def half_onnx_export(model, args, f, *rest, **kwargs):
    Path(f).write_bytes(b"\x08\x07 half a model")
    raise RuntimeError("exporter crashed\nwith a long story")


def test_an_onnx_export_that_fails_or_misses_the_tolerance_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    overrides = [f"ckpt_path={checkpoint}", "check_images=8", "batch_size=8"]
    with pytest.raises(SkuvisionError, match=r"differs from PyTorch .* nothing was written"):
        export(compose_cfg("export", overrides + ["tolerance=-1"], tmp_path / "strict"))
    assert list((tmp_path / "strict").iterdir()) == []
    monkeypatch.setattr(torch.onnx, "export", half_onnx_export)
    with pytest.raises(SkuvisionError, match="ONNX export of simple_cnn failed: exporter crashed"):
        export(compose_cfg("export", overrides, tmp_path / "crash"))
    assert list((tmp_path / "crash").iterdir()) == []


def write_sweep(sweep: Path) -> None:
    """A sweep folder of one failed job whose backbone and error read as formulas."""
    job = sweep / "0"
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"model": {"name": "=HYPERLINK(1)"}}), job / ".hydra" / "config.yaml")
    (job / "failed.json").write_text(json.dumps({"error": "-boom"}))


def test_leaderboard_is_never_replaced_and_quotes_formulas(tmp_path):
    write_sweep(tmp_path / "sweep")
    write_leaderboard(tmp_path / "sweep")
    with open(tmp_path / "sweep" / "leaderboard.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert (row["backbone"], row["error"], row["status"]) == ("'=HYPERLINK(1)", "'-boom", "failed")
    before = snapshot(tmp_path / "sweep")
    one_line_refusal(lambda: write_leaderboard(tmp_path / "sweep"), "leaderboard.md exists")
    assert snapshot(tmp_path / "sweep") == before


def test_predict_cli_into_an_earlier_run_folder_changes_nothing(checkpoint, photos, tmp_path):
    """Hydra's own .hydra/ config and log of the earlier run included: refused before Hydra writes them."""
    image = sorted((photos / "phone").glob("*.png"))[0]
    overrides = [f"ckpt_path={checkpoint}", f"input={image}", "trainer.accelerator=cpu", "num_workers=0"]
    run = [f"hydra.run.dir={tmp_path / 'run'}"]
    first = run_cli("predict.py", overrides + run, tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    before = snapshot(tmp_path / "run")
    assert {".hydra", "predictions.csv"} <= {p.name for p in before}
    again = run_cli("predict.py", overrides + run, tmp_path)
    assert again.returncode == 2 and again.stdout == ""
    (line,) = again.stderr.strip().splitlines()
    assert (
        line.startswith(f"error: hydra.run.dir={tmp_path / 'run'} already holds .hydra") and "nothing" in line
    )
    assert snapshot(tmp_path / "run") == before


@pytest.mark.parametrize("task", ["audit", "embed", "eval", "export", "predict", "shard"])
def test_every_task_but_train_refuses_an_earlier_run_folder(task, tmp_path):
    """The Hydra callback the predict.py test above runs is the one every such task's config names."""
    cfg = compose_cfg(task, [], tmp_path / "run")
    assert cfg.hydra.callbacks.new_run_folder._target_ == "skuvision.tasks.utils.NewRunFolder"
    assert "new_run_folder" not in compose_cfg("train", [], tmp_path / "train").hydra.callbacks


def test_eval_without_ckpt_path_is_one_line_naming_the_key(tmp_path):
    result = run_cli("eval.py", [], tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == (
        "error: ckpt_path is not set: give it on the command line, e.g. python eval.py "
        "ckpt_path=outputs/<date>/<time> (a train.py run folder, or a .ckpt in its checkpoints/)"
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
    from skuvision.tasks.compare import compare
    from skuvision.tasks.shard import shard
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
    from skuvision.tasks.utils import MANDATORY_EXAMPLES
    from tests.helpers import CONF

    mandatory = set()
    for path in CONF.rglob("*.yaml"):
        group = path.parent.relative_to(CONF).parts
        for line in path.read_text().splitlines():
            name, _, value = line.partition(":")
            if value.split("#")[0].strip() == "???":
                assert not name.startswith(" "), f"{path}: a nested mandatory key"
                mandatory.add(".".join([*group[:1], name]))
    assert mandatory and mandatory <= set(MANDATORY_EXAMPLES), mandatory - set(MANDATORY_EXAMPLES)
