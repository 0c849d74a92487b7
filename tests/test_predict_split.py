"""predict.py split=: a split of the checkpoint's data (or of data=) instead of input= files, on one process
and on several, each image once in the split's stored order, resumable from shards."""

import csv
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.shards import STOP_AFTER, shard_files
from skuvision.tasks.predict import predict
from tests.helpers import compose_cfg
from tests.pages import picture, read_page
from tests.test_many_processes import stored_labels

ONE_PROCESS = ["num_workers=0", "trainer.accelerator=cpu", "trainer.precision=32", "threads=1"]
CIFAR = ["data=cifar10", "data.download=false", "batch_size=8"]


def read_csv(path: Path) -> tuple[list[str], list[dict]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[float(r[f"prob_{i}"]) for i in (1, 2, 3)] for r in rows])


@pytest.mark.slow
def test_predict_of_a_streaming_split_on_two_processes_resumes_and_matches_one(
    serve_checkpoint,
    data_root,
    tmp_path,
    monkeypatch,
    capsys,
):
    """litdata shards (data=streaming): a run stopped after its first shard (one process, shards=true) is
    finished by 2 CPU processes started in-process, which keep that shard; each stored image once, rows in
    stored order with their true label, probabilities those of one process."""
    shards = data_root / "shards"
    overrides = [f"ckpt_path={serve_checkpoint}", "split=train", *ONE_PROCESS, "top_k=3"]
    overrides += ["data=streaming", f"data.root={shards}", "batch_size=4", "shard_size=4"]
    header, expected = read_csv(predict(compose_cfg("predict", overrides, tmp_path / "one")))
    labels = stored_labels(shards, "train")
    assert [r["path"] for r in expected] == [f"train[{i}]" for i in range(len(labels))]
    names = ["phone", "shirt", "toaster"]  # the data's classes, not the checkpoint's 4
    assert header[:3] == ["path", "error", "true"]
    assert [r["true"] for r in expected] == [names[k] for k in labels]
    assert not (tmp_path / "one" / "predictions.html").exists()  # no gallery of litdata items, and why
    assert "gallery: none for split=train of litdata shards" in capsys.readouterr().out
    run = tmp_path / "two"
    monkeypatch.setenv(STOP_AFTER, "1")
    with pytest.raises(RuntimeError, match=STOP_AFTER):
        predict(compose_cfg("predict", [*overrides, "shards=true"], run))
    monkeypatch.delenv(STOP_AFTER)
    (first,) = shard_files(run / "shards")
    kept = (first.stat().st_ino, first.stat().st_mtime_ns)
    assert not (run / "predictions.csv").exists()
    two = [o for o in overrides if not o.startswith("trainer.accelerator")]
    predict(compose_cfg("predict", [*two, "trainer=ddp_cpu", "trainer.devices=2"], run))
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept  # not redone
    written = shard_files(run / "shards")
    positions = [pq.read_table(p).column("index").to_numpy() for p in written]
    assert sorted(np.concatenate(positions).tolist()) == list(range(len(labels)))  # every image once
    assert {p.name.split("-")[1] for p in written if p != first} == {"rank0", "rank1"}
    got_header, got = read_csv(run / "predictions.csv")
    assert got_header == header
    assert [r["path"] for r in got] == [r["path"] for r in expected]
    assert [r["true"] for r in got] == [r["true"] for r in expected]
    assert [r["label_1"] for r in got] == [r["label_1"] for r in expected]
    np.testing.assert_allclose(probabilities(got), probabilities(expected), atol=1e-5)


def test_predict_of_an_in_memory_split_answers_as_its_images_given_as_files(
    serve_checkpoint,
    data_root,
    tmp_path,
    capsys,
):
    """CIFAR-10's test split held in memory, on one process: rows `test[<i>]` in the split's order with their
    true class, the same top-1 and probabilities as the same images written as PNG files and given by
    input=; its gallery shows the split's own images. In shards (what each of several processes runs) the
    same rows."""
    from skuvision.assembly import data_module, load_classifier

    split = [f"ckpt_path={serve_checkpoint}", "split=test", *ONE_PROCESS, *CIFAR]
    split.append(f"data.root={data_root / 'cifar'}")
    header, rows = read_csv(predict(compose_cfg("predict", split, tmp_path / "split")))
    cifar = compose_cfg("predict", split, tmp_path / "unused").data
    source = data_module(cifar, load_classifier(serve_checkpoint).input_config, "test")
    source.setup("predict")
    dataset = source.splits["test"]
    assert [r["path"] for r in rows] == [f"test[{i}]" for i in range(len(dataset))]
    assert [r["true"] for r in rows] == [source.class_names[int(dataset[i][1])] for i in range(len(dataset))]
    files = tmp_path / "files"
    files.mkdir()
    for i in range(len(dataset)):
        Image.fromarray(dataset[i][0].permute(1, 2, 0).numpy()).save(files / f"{i:03d}.png")
    inputs = [f"ckpt_path={serve_checkpoint}", f"input={files}", *ONE_PROCESS, "batch_size=8"]
    _, answers = read_csv(predict(compose_cfg("predict", inputs, tmp_path / "input")))
    assert [r["label_1"] for r in rows] == [r["label_1"] for r in answers]
    np.testing.assert_allclose(probabilities(rows), probabilities(answers), atol=1e-4)
    page = read_page(tmp_path / "split" / "predictions.html")
    assert sorted(t.name for t in page.tiles) == sorted(r["path"] for r in rows)
    images = np.stack([dataset[i][0].permute(1, 2, 0).numpy() for i in range(len(dataset))]).astype(float)
    for tile in page.tiles:  # each tile shows its own image of the split, and its true class
        i = int(tile.name.removeprefix("test[").removesuffix("]"))
        shown = np.asarray(picture(tile.images[0]["src"]), dtype=float)
        distance = np.abs(images - shown).mean(axis=(1, 2, 3))  # a JPEG thumbnail: nearest, not equal
        assert distance.argmin() == i, distance
        assert tile.cells[0][:2] == ["true", rows[i]["true"]]
    assert "gallery: none" not in capsys.readouterr().out
    sharded = [*split, "shards=true", "shard_size=7", "gallery=false"]
    _, in_shards = read_csv(predict(compose_cfg("predict", sharded, tmp_path / "sharded")))
    assert [r["path"] for r in in_shards] == [r["path"] for r in rows]
    assert [r["true"] for r in in_shards] == [r["true"] for r in rows]
    np.testing.assert_allclose(probabilities(in_shards), probabilities(rows), atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["input=photos", "split=test"], r"^input= and split=test both given: predict files"),
        ([], r"^input is not set: give it on the command line, e.g. python predict.py input=.*or split=test"),
        (["split=test", "explain=gradcam"], r"^explain= takes input= files: leave it out with split=test$"),
        (["split=test", "unknown=eval_run"], r"^unknown= takes input= files"),
        (["input=photos", "data=cifar10"], r"^data= chooses the data of split=: with input= files"),
        (["split=holdout", *CIFAR], r"^split=holdout: choose one of \['test', 'train', 'val'\]$"),
        (
            ["split=test", "trainer=ddp_cpu", "shards=false"],
            r"^shards=false on 2 processes: several processes",
        ),
    ],
)
def test_predict_refuses_both_or_neither_source_and_an_unknown_split_in_one_line(
    extra,
    message,
    serve_checkpoint,
    data_root,
    tmp_path,
):
    overrides = [f"ckpt_path={serve_checkpoint}", *ONE_PROCESS, *extra]
    if "data=cifar10" in extra and "split=holdout" in extra:
        overrides.append(f"data.root={data_root / 'cifar'}")
    with pytest.raises(SkuvisionError, match=message):
        predict(compose_cfg("predict", overrides, tmp_path / "run"))
    assert not (tmp_path / "run" / "predictions.csv").exists()


def test_predict_of_a_split_of_a_table_with_several_columns_carries_each_columns_truth(
    catalogue_run, catalogue_export, tmp_path
):
    """A manifest split of a model with several heads: `<column>_true` per column, as the table says for
    the row's image (empty where the row has no value), in one pass and in shards alike."""
    from tests.conftest import CATALOGUE_LABELS

    table = {line.split(",")[0]: line.split(",") for line in catalogue_export.read_text().splitlines()}
    header = table.pop("id")
    overrides = [f"ckpt_path={catalogue_run}", "split=test", *ONE_PROCESS, "gallery=false"]
    answers = {}
    for name, extra in (("one", []), ("sharded", ["shards=true", "shard_size=5"])):
        columns, answers[name] = read_csv(
            predict(compose_cfg("predict", [*overrides, *extra], tmp_path / name))
        )
        truths = [f"{c}_true" for c in [*CATALOGUE_LABELS, "tags"]]
        assert set(truths) <= set(columns) and columns.index(truths[0]) == 2
    assert answers["sharded"] == answers["one"]
    assert len(answers["one"]) > 5
    for row in answers["one"]:
        cells = dict(zip(header, table[Path(row["path"]).stem], strict=False))
        for column in CATALOGUE_LABELS:
            assert row[f"{column}_true"] == cells[column].strip(), (column, row["path"])
        assert set(filter(None, row["tags_true"].split(";"))) == set(filter(None, cells["tags"].split(";")))
    assert any(row["baseColour_true"] == "" for row in answers["one"])  # rows without a colour
