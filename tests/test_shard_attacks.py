"""A resumed predict/embed run reads its run folder's shards/ and plan.json: each test plants what an attacker
who can write into that folder could, and the run refuses it, naming the file, without following a link."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import OmegaConf

from skuvision.errors import SkuvisionError
from skuvision.shards import PLAN, as_columns, check_plan, merge, read_shards, shard_files, write_shard
from skuvision.tasks.utils import NewRunFolder

ITEMS = [f"/photos/{i:02d}.jpg" for i in range(8)]
COLUMNS = {"out": 3}


def outputs(rows) -> dict:
    return as_columns(torch.arange(len(rows) * 3, dtype=torch.float32).reshape(-1, 3) + rows[0])


@pytest.fixture
def shards(tmp_path) -> Path:
    """A run's shards/: positions 0-3 (rank 0's first shard) and 4-5 (rank 1's), 6 and 7 still to do."""
    folder = tmp_path / "run" / "shards"
    for rank, rows in ((0, [0, 1, 2, 3]), (1, [4, 5])):
        write_shard(folder, rank, np.array(rows), [ITEMS[i] for i in rows], [""] * len(rows), outputs(rows))
    return folder


def plant(folder: Path, table: pa.Table, first: int = 6, rank: int = 0) -> Path:
    """`table` as a shard named the way this code names one, its SHA-256 true: only the content is wrong."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    data = sink.getvalue().to_pybytes()
    path = folder / f"{first:010d}-rank{rank}-{hashlib.sha256(data).hexdigest()}.parquet"
    path.write_bytes(data)
    return path


def good_table(rows=(6, 7), paths=None, width: int = 3) -> dict:
    values = np.ones((len(rows), width), np.float32)
    return {
        "index": pa.array(rows, pa.int64()),
        "path": pa.array(paths or [ITEMS[i] for i in rows], pa.string()),
        "error": pa.array([""] * len(rows), pa.string()),
        "out": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), width),
    }


def test_the_run_own_shards_are_read_and_merged(shards):
    tables = read_shards(shards, ITEMS, COLUMNS)
    assert sorted(np.concatenate([t.column("index").to_numpy() for t in tables]).tolist()) == list(range(6))
    write_shard(shards, 0, np.array([6, 7]), ITEMS[6:], ["", "bad"], outputs([6, 7]))
    merged, errors = merge(shards, ITEMS, COLUMNS)
    assert merged[:, 0].tolist() == [0, 3, 6, 9, 4, 7, 6, 9] and errors[-1] == "bad"


@pytest.mark.parametrize(
    "name",
    ["notes.parquet", "0000000006-rank0.parquet", "0000000006-rank0-" + "0" * 64 + ".parquet.bak", "x"],
)
def test_a_file_not_named_as_a_shard_is_refused(shards, name):
    (shards / name).write_bytes(b"anything")
    with pytest.raises(SkuvisionError, match=rf"{name.replace('.', '[.]')} is not a shard this code writes"):
        read_shards(shards, ITEMS, COLUMNS)


def test_a_planted_well_formed_shard_of_other_paths_is_refused(shards):
    plant(shards, pa.table(good_table(paths=["/etc/passwd", ITEMS[7]])))
    with pytest.raises(SkuvisionError, match=r"-rank0-.*position 6 is '/photos/06.jpg' in this run's input"):
        read_shards(shards, ITEMS, COLUMNS)


@pytest.mark.parametrize(
    ("rows", "first"),
    [([6, 6], 6), ([7, 6], 7), ([5, 6], 5), ([6, 8], 6), ([-1, 6], 0), ([6, 7], 0)],
    ids=["duplicated", "decreasing", "held-by-another-shard", "past-the-end", "negative", "name-not-first"],
)
def test_rows_at_positions_not_this_shard_own_are_refused(shards, rows, first):
    paths = [ITEMS[i] if 0 <= i < len(ITEMS) else "x" for i in rows]
    plant(shards, pa.table(good_table(rows, paths)), first=max(first, 0))
    with pytest.raises(SkuvisionError, match=r"positions are not increasing|also in another shard"):
        read_shards(shards, ITEMS, COLUMNS)


@pytest.mark.parametrize(
    "change",
    [
        "extra column",
        "missing column",
        "float64 outputs",
        "int32 index",
        "width 4",
        "variable lists",
        "nulls",
    ],
)
def test_other_columns_types_widths_or_missing_values_are_refused(shards, change):
    columns = good_table()
    if change == "extra column":
        columns["code"] = pa.array([b"\x80\x04", b""], pa.binary())
    elif change == "missing column":
        del columns["error"]
    elif change == "float64 outputs":
        columns["out"] = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(6)), 3)
    elif change == "int32 index":
        columns["index"] = pa.array([6, 7], pa.int32())
    elif change == "width 4":
        columns = good_table(width=4)
    elif change == "variable lists":
        columns["out"] = pa.array([[1.0, 2.0, 3.0], [1.0]], pa.list_(pa.float32()))
    else:
        columns["out"] = pa.FixedSizeListArray.from_arrays(pa.array([1, None, 3, 4, 5, 6], pa.float32()), 3)
    plant(shards, pa.table(columns))
    with pytest.raises(SkuvisionError, match=r"-rank0-.*: (columns \[|missing values in out)"):
        read_shards(shards, ITEMS, COLUMNS)


def test_a_truncated_or_changed_shard_is_refused(shards):
    shard = shard_files(shards)[0]
    data = shard.read_bytes()
    os.chmod(shard, 0o644)
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(SkuvisionError, match=rf"{shard.name}: its bytes do not match the SHA-256"):
        read_shards(shards, ITEMS, COLUMNS)
    shard.unlink()
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 1
    changed = shard.with_name(shard.name)
    changed.write_bytes(bytes(flipped))
    with pytest.raises(SkuvisionError, match=r"do not match the SHA-256"):
        read_shards(shards, ITEMS, COLUMNS)
    changed.unlink()
    # Renamed to the truncated bytes' own hash: then Parquet itself refuses.
    truncated = data[: len(data) // 2]
    (shards / f"0000000000-rank0-{hashlib.sha256(truncated).hexdigest()}.parquet").write_bytes(truncated)
    with pytest.raises(SkuvisionError, match=r"not a readable Parquet file"):
        read_shards(shards, ITEMS, COLUMNS)


def test_links_where_shards_go_are_refused_and_not_followed(shards, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    target = shard_files(shards)[1]
    elsewhere = outside / target.name
    os.rename(target, elsewhere)
    os.symlink(elsewhere, target)  # the same bytes, reached through a link
    with pytest.raises(SkuvisionError, match=rf"{target.name} is a symbolic link"):
        read_shards(shards, ITEMS, COLUMNS)
    target.unlink()
    os.symlink("/etc/passwd", shards / f"0000000006-rank0-{'0' * 64}.parquet")
    with pytest.raises(SkuvisionError, match=r"is a symbolic link"):
        read_shards(shards, ITEMS, COLUMNS)

    # shards/ itself a link to another folder: neither read from nor written to.
    run = tmp_path / "other_run"
    run.mkdir()
    os.symlink(outside, run / "shards")
    with pytest.raises(SkuvisionError, match=r"other_run/shards is not a folder of this run's own"):
        read_shards(run / "shards", ITEMS, COLUMNS)
    with pytest.raises(SkuvisionError, match=r"not a folder of this run's own"):
        write_shard(run / "shards", 0, np.array([6]), ITEMS[6:7], [""], outputs([6]))
    assert os.listdir(outside) == [elsewhere.name]


def plan(**changes) -> dict:
    return {"task": "predict", "items": 8, "items_sha256": "ab" * 32, "columns": COLUMNS, **changes}


@pytest.mark.parametrize(
    ("written", "match"),
    [
        (json.dumps(plan(items_sha256="cd" * 32)), r"another run \(items_sha256 differ\)"),
        (json.dumps(plan(columns={"out": 4})), r"another run \(columns differ\)"),
        (json.dumps(plan(shard_size=2)), r"another run \(shard_size differ\)"),
        (json.dumps([plan()]), r"plan.json is not a plan this code wrote"),
        ("{not json", r"plan.json is not a plan this code wrote"),
        (b"\xff\xfe{}", r"plan.json is not a plan this code wrote"),
        (" " * (1 << 21), r"plan.json is over 1048576 bytes"),
    ],
    ids=["other-inputs", "other-widths", "other-key", "a-list", "not-json", "not-utf8", "huge"],
)
def test_an_edited_plan_is_refused(tmp_path, written, match):
    path = tmp_path / PLAN
    path.write_bytes(written if isinstance(written, bytes) else written.encode())
    with pytest.raises(SkuvisionError, match=match):
        check_plan(tmp_path, plan())


def test_a_plan_linked_elsewhere_is_not_read(tmp_path):
    real = tmp_path / "real.json"
    real.write_text(json.dumps(plan()))
    os.symlink(real, tmp_path / PLAN)
    with pytest.raises(SkuvisionError, match=r"plan.json is a symbolic link"):
        check_plan(tmp_path, plan())
    (tmp_path / PLAN).unlink()
    os.mkfifo(tmp_path / PLAN)  # would block a reader forever
    with pytest.raises(SkuvisionError, match=r"plan.json is not a plain file"):
        check_plan(tmp_path, plan())


@pytest.mark.parametrize("link", ["predict.log", ".hydra/config.yaml", ".hydra", "shards/notes"])
def test_a_resumed_run_folder_with_a_link_is_refused_before_hydra_writes(tmp_path, capsys, link):
    run = tmp_path / "run"
    (run / "shards").mkdir(parents=True)
    (run / "shards" / PLAN).write_text(json.dumps(plan()))
    (run / ".hydra").mkdir()
    victim = tmp_path / "victim"
    victim.write_text("kept\n")
    place = run / link
    if place.exists():
        os.rmdir(place) if place.is_dir() else place.unlink()
    os.symlink(victim, place)
    config = OmegaConf.create(
        {"hydra": {"run": {"dir": str(run)}, "output_subdir": ".hydra"}, "task_name": "predict"}
    )
    with pytest.raises(SystemExit) as stopped:
        NewRunFolder().on_run_start(config)
    assert stopped.value.code == 2
    assert f"error: {place} is a symbolic link" in capsys.readouterr().err
    assert victim.read_text() == "kept\n"


def test_no_code_runs_from_the_files_a_resume_reads():
    """Parquet shards and a JSON plan: nothing is unpickled. pyarrow before 14.0.1 loaded pickled extension
    types from Parquet metadata (CVE-2023-47248)."""
    major, minor, patch = (int(p) for p in pa.__version__.split(".")[:3])
    assert (major, minor, patch) >= (14, 0, 1)
    import skuvision.shards

    source = Path(skuvision.shards.__file__).read_text()
    for call in ("import pickle", "pickle.load", "np.load(", "torch.load(", " eval(", " exec("):
        assert call not in source
