"""predict.py and embed.py on 2 CPU processes (trainer=ddp_cpu): each image once, results equal to one
process's, in input order; a run stopped after its first shard resumes without redoing it."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from skuvision.data.inputs import collect_inputs
from skuvision.errors import SkuvisionError
from skuvision.outputs import write_new_json
from skuvision.shards import (
    PLAN,
    STOP_AFTER,
    as_columns,
    check_plan,
    merge,
    positions_left,
    read_shards,
    shard_files,
    write_shard,
)
from skuvision.tasks.embed import embed
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, predict_csv, quick_overrides, run_cli
from tests.pages import read_page
from tests.writers import write_image_folder, write_manifest

IMAGES = 24  # and one unreadable file


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("catalogue")
    write_image_folder(root, classes=("kettle", "phone", "shirt"), per_class=IMAGES // 3, size=40)
    (root / "phone" / "broken.jpg").write_bytes(b"not a jpeg")
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, photos) -> Path:
    run = tmp_path_factory.mktemp("train")
    overrides = quick_overrides("image_folder", run) + [
        f"data.root={photos}",
        "trainer.max_epochs=1",
        "trainer.precision=32",
        "tta=none",
    ]
    train(compose_cfg("train", overrides, run / "run"))
    return Path(json.loads((run / "run" / "metrics.json").read_text())["checkpoint"])


def on_two_processes(script: str, checkpoint: Path, photos: Path, run: Path, *extra: str, stop: bool = False):
    overrides = [
        f"ckpt_path={checkpoint}",
        f"input={photos}",
        "trainer=ddp_cpu",
        "trainer.devices=2",
        "trainer.precision=32",
        "batch_size=4",
        "shard_size=4",  # 13 and 12 images per process: 4 shards each
        "num_workers=0",
        "threads=1",
        f"hydra.run.dir={run}",
        *extra,
    ]
    env = {"OMP_NUM_THREADS": "1", **({STOP_AFTER: "1"} if stop else {})}
    run.parent.mkdir(parents=True, exist_ok=True)
    return run_cli(script, overrides, run.parent, env)


def stopped_then_resumed(script: str, checkpoint: Path, photos: Path, run: Path, *extra: str) -> dict:
    """Run stopped after each process's first shard, then the same command again: the shards the first
    attempt finished, {name: (inode, mtime)}, checked unchanged after the rerun."""
    stopped = on_two_processes(script, checkpoint, photos, run, *extra, stop=True)
    assert stopped.returncode != 0 and STOP_AFTER in stopped.stderr, stopped.stderr[-3000:]
    first = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files(run / "shards")}
    assert 1 <= len(first) <= 2, first
    resumed = on_two_processes(script, checkpoint, photos, run, *extra)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the unfinished run" in resumed.stderr
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files(run / "shards")}
    assert {name: after[name] for name in first} == first  # not rewritten
    positions = np.concatenate(
        [pq.read_table(p).column("index").to_numpy() for p in shard_files(run / "shards")]
    )
    assert sorted(positions.tolist()) == list(range(IMAGES + 1))  # every image once
    assert len(after) > len(first)
    return first


@pytest.mark.slow
def test_predict_on_two_processes_resumes_and_matches_one(checkpoint, photos, tmp_path):
    header, expected = predict_csv(checkpoint, photos, tmp_path / "one")
    run = tmp_path / "two" / "run"
    stopped_then_resumed("predict.py", checkpoint, photos, run)
    with open(run / "predictions.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == header
    assert [r["path"] for r in rows] == [r["path"] for r in expected]  # input order
    assert sum(bool(r["error"]) for r in rows) == 1
    for got, want in zip(rows, expected, strict=True):
        assert [got[f"label_{i}"] for i in (1, 2, 3)] == [want[f"label_{i}"] for i in (1, 2, 3)]
        probs = [float(got[f"prob_{i}"] or 0) - float(want[f"prob_{i}"] or 0) for i in (1, 2, 3)]
        assert np.abs(probs).max() <= 1e-5
    # Rank zero writes the gallery of every image, as one process does.
    shown = [t.name for t in read_page(run / "predictions.html").tiles]
    assert sorted(shown) == sorted(
        t.name for t in read_page(tmp_path / "one" / "run" / "predictions.html").tiles
    )
    assert len(shown) == len(rows)


@pytest.mark.slow
def test_embed_on_two_processes_resumes_and_matches_one(checkpoint, photos, tmp_path):
    overrides = [
        f"ckpt_path={checkpoint}",
        f"input={photos}",
        "num_workers=0",
        "trainer.accelerator=cpu",
        "trainer.precision=32",
    ]
    embed(compose_cfg("embed", overrides, tmp_path / "one"))
    expected = np.load(tmp_path / "one" / "embeddings.npz")
    run = tmp_path / "two" / "run"
    stopped_then_resumed("embed.py", checkpoint, photos, run)
    got = np.load(run / "embeddings.npz")
    assert got["items"].tolist() == expected["items"].tolist()  # input order, the unreadable file left out
    assert len(got["items"]) == IMAGES
    np.testing.assert_allclose(got["features"], expected["features"], atol=1e-5)
    assert (run / "index").is_dir() and (run / "neighbours.csv").is_file()
    assert os.listdir(run / "index")


def test_embed_of_a_manifest_split_on_two_processes_matches_one_pass(checkpoint, photos, tmp_path):
    """A split of a manifest (data=manifest) goes through the same shards with its labels, here on 2 CPU
    processes started in-process (ddp_spawn): each row once, in the split's order."""
    manifest = write_manifest(tmp_path / "catalogue" / "styles.csv", photos)
    overrides = [f"ckpt_path={checkpoint}", "split=train", "num_workers=0", "trainer.precision=32", "k=2"]
    overrides += ["data=manifest", f"data.root={manifest}", "threads=1"]
    embed(compose_cfg("embed", [*overrides, "trainer.accelerator=cpu"], tmp_path / "one"))
    two = [*overrides, "trainer=ddp_cpu", "trainer.devices=2", "shard_size=5", "batch_size=5"]
    embed(compose_cfg("embed", two, tmp_path / "two"))
    expected, got = (np.load(tmp_path / run / "embeddings.npz") for run in ("one", "two"))
    assert got["items"].tolist() == expected["items"].tolist()
    assert got["labels"].tolist() == expected["labels"].tolist()
    np.testing.assert_allclose(got["features"], expected["features"], atol=1e-5)
    ranks = {p.name.split("-")[1] for p in shard_files(tmp_path / "two" / "shards")}
    assert ranks == {"rank0", "rank1"}


def test_shards_of_several_heads_merge_in_input_order_each_image_once(tmp_path):
    logits = {"colour": np.arange(12, dtype=np.float32).reshape(6, 2), "tags": np.ones((6, 3), np.float32)}
    items = [f"img/{i}.jpg" for i in range(6)]
    errors = ["", "", "bad", "", "", ""]
    columns = {"out/colour": 2, "out/tags": 3}
    for rank, rows in ((1, [1, 3, 5]), (0, [0, 2, 4])):
        part = as_columns({k: torch.from_numpy(v[rows]) for k, v in logits.items()})
        write_shard(tmp_path, rank, np.array(rows), [items[i] for i in rows], [errors[i] for i in rows], part)
    merged, read_errors = merge(tmp_path, items, columns)
    assert list(merged) == ["colour", "tags"] and read_errors == errors
    assert merged["colour"].numpy().tolist() == logits["colour"].tolist()
    again = as_columns({k: torch.from_numpy(v[[5]]) for k, v in logits.items()})
    write_shard(tmp_path, 0, np.array([5]), [items[5]], [""], again)
    with pytest.raises(SkuvisionError, match=r"position 5 is also in another shard"):
        merge(tmp_path, items, columns)


def test_shards_of_another_plan_are_refused_and_too_few_images_for_the_processes(tmp_path):
    write_new_json(tmp_path / PLAN, {"task": "predict", "items": 25, "tta": "none"})
    check_plan(tmp_path, {"task": "predict", "items": 25, "tta": "none"})
    with pytest.raises(SkuvisionError, match=r"holds shards of another run \(tta differ\)"):
        check_plan(tmp_path, {"task": "predict", "items": 25, "tta": "flip"})
    items = [f"{i}.jpg" for i in range(6)]
    write_shard(tmp_path, 0, np.arange(4), items[:4], [""] * 4, as_columns(torch.zeros(4, 2)))
    tables = read_shards(tmp_path, items, {"out": 2})
    assert positions_left(tables, 6, 2, tmp_path) == [4, 5]
    with pytest.raises(SkuvisionError, match=r"1 image\(s\) left for 2 processes"):
        positions_left(read_shards(tmp_path, items[:5], {"out": 2}), 5, 2, tmp_path)


def test_a_resume_refuses_a_planted_shard_then_finishes_without_redoing_its_own(
    checkpoint, photos, tmp_path, monkeypatch
):
    """In-process, one process with shards=true: stopped after its first shard; a file planted beside it
    stops the rerun before any image is read, naming it; without it the rerun finishes."""
    from skuvision.tasks.predict import predict

    run = tmp_path / "run"
    overrides = [f"ckpt_path={checkpoint}", f"input={photos}", "num_workers=0", "trainer.accelerator=cpu"]
    overrides += ["trainer.precision=32", "shards=true", "shard_size=10", "batch_size=5"]
    monkeypatch.setenv(STOP_AFTER, "1")
    with pytest.raises(RuntimeError, match=STOP_AFTER):
        predict(compose_cfg("predict", overrides, run))
    monkeypatch.delenv(STOP_AFTER)
    (first,) = shard_files(run / "shards")
    planted = run / "shards" / first.name.replace("0000000000-rank0", "0000000010-rank0")
    planted.write_bytes(first.read_bytes())  # a true SHA-256, at positions it does not hold
    with pytest.raises(SkuvisionError, match=rf"{planted.name}: its positions are not increasing"):
        predict(compose_cfg("predict", overrides, run))
    assert not (run / "predictions.csv").exists()
    planted.unlink()
    inode = first.stat().st_ino
    predict(compose_cfg("predict", overrides, run))
    assert first.stat().st_ino == inode
    with open(run / "predictions.csv", newline="") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [str(p) for p in collect_inputs(str(photos))]


def stored_labels(shards: Path, split: str) -> list[int]:
    """Each stored image's label by its stored index, read straight from the litdata chunks."""
    from litdata import StreamingDataset

    stream = StreamingDataset(str(shards / split), shuffle=False)
    items = [stream[i] for i in range(len(stream))]
    labels = dict((item["index"], item["label"]) for item in items)
    return [labels[i] for i in range(len(items))]


@pytest.mark.slow
def test_embed_of_a_streaming_split_on_two_processes_resumes_and_matches_one(
    checkpoint, data_root, tmp_path, monkeypatch
):
    """litdata shards (data=streaming): a run stopped after its first shard (one process, shards=true) is
    finished by 2 CPU processes started in-process, which keep that shard and split the rest of the chunks
    the way litdata does with drop_last=False (uneven shares); each image once, in stored order, the vectors
    those of one process."""
    shards = data_root / "shards"
    overrides = [f"ckpt_path={checkpoint}", "split=train", "num_workers=0", "trainer.precision=32", "k=2"]
    overrides += ["data=streaming", f"data.root={shards}", "threads=1", "batch_size=4", "shard_size=4"]
    embed(compose_cfg("embed", [*overrides, "trainer.accelerator=cpu"], tmp_path / "one"))
    expected = np.load(tmp_path / "one" / "embeddings.npz")
    labels = stored_labels(shards, "train")
    assert expected["labels"].tolist() == labels  # one process: in stored order too
    run = tmp_path / "two"
    monkeypatch.setenv(STOP_AFTER, "1")
    with pytest.raises(RuntimeError, match=STOP_AFTER):
        embed(compose_cfg("embed", [*overrides, "trainer.accelerator=cpu", "shards=true"], run))
    monkeypatch.delenv(STOP_AFTER)
    (first,) = shard_files(run / "shards")
    kept = (first.stat().st_ino, first.stat().st_mtime_ns)
    assert not (run / "embeddings.npz").exists()
    embed(compose_cfg("embed", [*overrides, "trainer=ddp_cpu", "trainer.devices=2"], run))
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept
    written = shard_files(run / "shards")
    positions = [pq.read_table(p).column("index").to_numpy() for p in written]
    assert sorted(np.concatenate(positions).tolist()) == list(range(len(labels)))  # every image once
    assert {p.name.split("-")[1] for p in written if p != first} == {"rank0", "rank1"}
    got = np.load(run / "embeddings.npz")
    assert got["items"].tolist() == [f"train[{i}]" for i in range(len(labels))]
    assert got["items"].tolist() == expected["items"].tolist()
    assert got["labels"].tolist() == labels
    np.testing.assert_allclose(got["features"], expected["features"], atol=1e-5)


def test_predict_of_a_manifest_answers_each_row_once_in_its_order(checkpoint, photos, tmp_path, monkeypatch):
    """input=<manifest.csv> (data=manifest's table): one row per manifest row, in the table's order (here
    reversed, with a row repeated), paths relative to the table's folder whatever the working folder; in
    shards (shards=true: the code each of several processes runs) as on one process."""
    from skuvision.tasks.predict import predict

    manifest = write_manifest(tmp_path / "catalogue" / "styles.csv", photos)
    rows = manifest.read_text().splitlines()
    manifest.write_text("\n".join([rows[0], *reversed(rows[1:]), rows[1]]) + "\n")
    wanted = [
        str((manifest.parent / line.split(",")[0]).resolve()) for line in manifest.read_text().split()[1:]
    ]
    monkeypatch.chdir(tmp_path)  # not the manifest's folder
    overrides = [f"ckpt_path={checkpoint}", f"input={manifest}", "num_workers=0", "trainer.accelerator=cpu"]
    overrides += ["trainer.precision=32", "batch_size=5"]
    answers = {}
    for name, extra in (("one", []), ("sharded", ["shards=true", "shard_size=7"])):
        with open(predict(compose_cfg("predict", [*overrides, *extra], tmp_path / name)), newline="") as f:
            answers[name] = list(csv.DictReader(f))
        assert [r["path"] for r in answers[name]] == wanted
        assert [r["path"] for r in answers[name] if r["error"]] == [p for p in wanted if "broken" in p]
    assert [r["label_1"] for r in answers["sharded"]] == [r["label_1"] for r in answers["one"]]
    repeated = answers["one"][-2:]  # the first row, last in the reversed order and again after it
    assert repeated[0] == repeated[1] and repeated[0]["path"] == wanted[-1]
    manifest.write_text('path,label\n"a.jpg,kettle\n')
    with pytest.raises(SkuvisionError, match=rf"^input={manifest} line 2 is not a row"):
        predict(compose_cfg("predict", overrides, tmp_path / "bad"))


def test_embed_of_an_in_memory_split_in_shards_resumes_and_matches_one_pass(
    checkpoint, data_root, tmp_path, monkeypatch
):
    """A split held in memory (CIFAR-10's test images here) in shards (shards=true: what each of several
    processes runs, Lightning's sampler dealing the positions): stopped after its first shard, the rerun
    keeps it, and the result is the one-pass one, each image once, in the split's order."""
    overrides = [f"ckpt_path={checkpoint}", "split=test", "num_workers=0", "trainer.precision=32", "k=2"]
    overrides += ["data=cifar10", f"data.root={data_root / 'cifar'}", "data.download=false", "threads=1"]
    overrides += ["trainer.accelerator=cpu", "batch_size=8"]
    embed(compose_cfg("embed", overrides, tmp_path / "one"))
    expected = np.load(tmp_path / "one" / "embeddings.npz")
    run = tmp_path / "sharded"
    sharded = [*overrides, "shards=true", "shard_size=8"]
    monkeypatch.setenv(STOP_AFTER, "1")
    with pytest.raises(RuntimeError, match=STOP_AFTER):
        embed(compose_cfg("embed", sharded, run))
    monkeypatch.delenv(STOP_AFTER)
    (first,) = shard_files(run / "shards")
    kept = (first.stat().st_ino, first.stat().st_mtime_ns)
    embed(compose_cfg("embed", sharded, run))
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == kept
    written = shard_files(run / "shards")
    positions = np.concatenate([pq.read_table(p).column("index").to_numpy() for p in written])
    assert sorted(positions.tolist()) == list(range(len(expected["items"]))) and len(written) > 1
    got = np.load(run / "embeddings.npz")
    assert got["items"].tolist() == expected["items"].tolist()
    assert got["labels"].tolist() == expected["labels"].tolist()
    np.testing.assert_allclose(got["features"], expected["features"], atol=1e-5)


def test_shards_of_a_split_keep_labels_and_a_shard_without_them_or_a_stored_index_out_of_range_is_refused(
    tmp_path,
):
    from skuvision.data.stream_positions import PositionedSample

    items = [f"train[{i}]" for i in range(4)]
    out = as_columns(torch.arange(8, dtype=torch.float32).reshape(4, 2))
    write_shard(tmp_path, 1, np.array([2, 3]), items[2:], ["", ""], {"out": out["out"][2:]}, np.array([5, 6]))
    write_shard(tmp_path, 0, np.array([0, 1]), items[:2], ["", ""], {"out": out["out"][:2]}, np.array([7, 8]))
    features, _, labels = merge(tmp_path, items, {"out": 2}, labels=True)
    assert labels == [7, 8, 5, 6] and features.numpy().tolist() == out["out"].tolist()
    with pytest.raises(SkuvisionError, match=r"columns \['index', 'path', 'error', 'out', 'label'\]"):
        merge(tmp_path, items, {"out": 2})  # a run without labels does not take these shards
    (shard,) = [p for p in shard_files(tmp_path) if "rank1" in p.name]
    shard.unlink()
    write_shard(tmp_path, 1, np.array([2, 3]), items[2:], ["", ""], {"out": out["out"][2:]})  # no labels
    with pytest.raises(SkuvisionError, match=r"columns \['index', 'path', 'error', 'out'\]"):
        merge(tmp_path, items, {"out": 2}, labels=True)
    blank = lambda item: (torch.zeros(3, 2, 2), item["label"])  # noqa: E731
    decode = PositionedSample(blank, np.zeros(4, bool), "s/train")
    assert decode({"index": 3, "label": 1})[1] == {"error": "", "index": 3, "label": 1}
    for index in (4, -1, "0", None):
        with pytest.raises(SkuvisionError, match=rf"^s/train: a stored item has index {index!r}, not a row"):
            decode({"index": index, "label": 1})
