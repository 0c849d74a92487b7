"""data=manifest: a CSV or Parquet catalogue export of paths, labels and splits."""

import codecs
import csv
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest
import torch

from skuvision.assembly import data_module
from skuvision.data import ManifestDataModule
from skuvision.data.manifest import read_table
from skuvision.errors import SkuvisionError
from skuvision.tasks.train import train
from tests.helpers import compose_cfg, quick_overrides
from tests.writers import write_image_folder, write_product_images

INPUT_32 = {
    "input_size": [3, 32, 32],
    "mean": [0.5] * 3,
    "std": [0.5] * 3,
    "interpolation": "bilinear",
    "crop_pct": 1,
}


@pytest.fixture
def shop(tmp_path) -> Path:
    """12 images in each of 3 classes under tmp_path/shop/<class>/."""
    return write_image_folder(tmp_path / "shop", per_class=12, size=32)


def table_of(folder: Path, relative_to: Path | None = None) -> pd.DataFrame:
    files = sorted(p for p in folder.rglob("*") if p.suffix in (".png", ".jpg"))
    paths = [str(p.relative_to(relative_to)) if relative_to else str(p) for p in files]
    return pd.DataFrame({"path": paths, "label": [p.parent.name for p in files]})


def ready(dm: ManifestDataModule) -> ManifestDataModule:
    dm.setup("fit")
    return dm


def files_in(dm: ManifestDataModule, split: str) -> set[Path]:
    return {path for path, _ in dm.splits[split].samples}


def test_relative_paths_resolve_against_the_manifest_and_absolute_ones_are_kept(tmp_path, shop):
    table = table_of(shop, relative_to=tmp_path)  # shop/<class>/x.png, relative to tmp_path
    table.loc[::2, "path"] = [str(tmp_path / p) for p in table["path"][::2]]  # every other row absolute
    assert table["path"].str.startswith("/").sum() == 18
    table.to_csv(tmp_path / "styles.csv", index=False)
    dm = ready(ManifestDataModule(str(tmp_path / "styles.csv"), INPUT_32))
    assert dm.class_names == ["phone", "shirt", "toaster"]
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 30, "val": 3, "test": 3}  # 10/1/1 per class
    used = set().union(*(files_in(dm, s) for s in dm.splits))
    assert used == {p for p in shop.rglob("*") if p.is_file()}
    assert dm.skipped == {}
    image, label = dm.splits["train"][0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    path, _ = dm.splits["train"].samples[0]
    assert dm.class_names[label] == path.parent.name


def test_missing_files_empty_labels_and_unreadable_files_are_skipped_and_listed(tmp_path, shop):
    table = table_of(shop, relative_to=tmp_path)
    missing = tmp_path / "shop" / "phone" / "gone.jpg"
    (shop / "shirt" / "notes.jpg").write_text("not an image")
    extra = pd.DataFrame(
        {
            "path": [
                "shop/phone/gone.jpg",
                "shop/shirt/notes.jpg",
                str(shop / "toaster" / "toaster_000.png"),
            ],
            "label": ["phone", "shirt", ""],
        }
    )
    table = pd.concat([table.iloc[1:], extra], ignore_index=True)  # toaster_000 appears only with no label
    table = table[table["path"] != "shop/toaster/toaster_000.png"]
    table.to_csv(tmp_path / "styles.csv", index=False)
    dm = ready(ManifestDataModule(str(tmp_path / "styles.csv"), INPUT_32))
    assert set(dm.skipped) == {
        str(missing),
        str(shop / "shirt" / "notes.jpg"),
        str(shop / "toaster" / "toaster_000.png"),
    }
    assert "file not found" in dm.skipped[str(missing)] and "row 35 (line 36)" in dm.skipped[str(missing)]
    assert dm.skipped[str(shop / "toaster" / "toaster_000.png")].startswith("empty label")
    used = set().union(*(files_in(dm, s) for s in dm.splits))
    assert len(used) == 36 - 2  # the first row (left out of the table) and the unlabelled one
    assert not {Path(p) for p in dm.skipped} & used


def test_a_chosen_label_column_and_a_split_column(tmp_path, shop):
    table = table_of(shop)
    table["masterCategory"] = "Apparel"
    table = table.rename(columns={"label": "articleType"})
    table["split"] = (["train"] * 8 + ["VAL"] * 2 + ["test"] * 2) * 3
    table.to_csv(tmp_path / "styles.csv", index=False)
    dm = ready(
        ManifestDataModule(
            str(tmp_path / "styles.csv"), INPUT_32, label_column="articleType", split_column="split"
        )
    )
    assert dm.class_names == ["phone", "shirt", "toaster"]
    for split in ("train", "val", "test"):
        expected = {Path(p) for p, s in zip(table["path"], table["split"], strict=True) if s.lower() == split}
        assert files_in(dm, split) == expected


def test_classes_are_the_labels_of_the_training_rows(tmp_path, shop):
    table = table_of(shop)
    table["split"] = ["test" if label == "toaster" else "train" for label in table["label"]]
    table.to_csv(tmp_path / "styles.csv", index=False)
    dm = ManifestDataModule(str(tmp_path / "styles.csv"), INPUT_32, split_column="split")
    assert dm.class_names == ["phone", "shirt"]
    with pytest.raises(SkuvisionError, match=r"row 25 \(line 26\): label='toaster' \(test\) is not among"):
        dm.setup("fit")


def test_a_bad_split_value_names_its_row(tmp_path, shop):
    table = table_of(shop)
    table["split"] = "train"
    table.loc[6, "split"] = "holdout"
    table.to_csv(tmp_path / "styles.csv", index=False)
    dm = ManifestDataModule(str(tmp_path / "styles.csv"), INPUT_32, split_column="split")
    with pytest.raises(
        SkuvisionError,
        match=r"styles\.csv row 7 \(line 8\): split='holdout' is not a split; use one of train",
    ):
        dm.setup("fit")


@pytest.mark.parametrize("key", ["label_column", "path_column", "split_column"])
def test_a_missing_column_names_the_key_and_the_columns(tmp_path, shop, key):
    table_of(shop).to_csv(tmp_path / "styles.csv", index=False)
    dm = ManifestDataModule(str(tmp_path / "styles.csv"), INPUT_32, **{key: "gender"})
    with pytest.raises(
        SkuvisionError,
        match=rf"^data\.{key}=gender is not a column of .*styles\.csv; its columns: path, label$",
    ):
        dm.setup("fit")


def test_parquet_with_integer_labels(tmp_path, shop):
    table = table_of(shop)
    table["label"] = table["label"].map({"phone": 7, "shirt": 3, "toaster": 11})
    table.to_parquet(tmp_path / "styles.parquet")
    dm = ready(ManifestDataModule(str(tmp_path / "styles.parquet"), INPUT_32))
    assert dm.class_names == ["11", "3", "7"]  # labels are names: sorted as text
    assert sum(len(s) for s in dm.splits.values()) == 36


def test_not_a_table(tmp_path):
    with pytest.raises(SkuvisionError, match=r"data.root=.*nowhere.csv is not a file"):
        _ = ManifestDataModule(str(tmp_path / "nowhere.csv"), INPUT_32).class_names
    (tmp_path / "styles.json").write_text("{}")
    with pytest.raises(SkuvisionError, match=r"a manifest is a .csv or .parquet file"):
        _ = ManifestDataModule(str(tmp_path / "styles.json"), INPUT_32).class_names


def write_csv(path: Path, rows: list[tuple[str, ...]], header=("path", "label")) -> Path:
    """The manifest as an export writes it: csv text, cells as given (spaces included)."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def shop_rows(shop: Path, split=None) -> list[tuple[str, ...]]:
    """(relative path, class[, split]) of every image, the path relative to shop's parent."""
    files = sorted(p for p in shop.rglob("*") if p.suffix in (".png", ".jpg"))
    rows = [(str(p.relative_to(shop.parent)), p.parent.name) for p in files]
    return [(*row, split(k)) for k, row in enumerate(rows)] if split else rows


def test_a_file_listed_again_is_used_once_in_its_first_rows_split(tmp_path, shop, caplog):
    """The same file, spelled five other ways, on rows for val and test: it stays in train only."""
    # 8 train, 2 val, 2 test per class (rows are sorted by class, 12 each)
    rows = shop_rows(shop, split=lambda k: ("train",) * 8 + ("val",) * 2 + ("test",) * 2)
    rows = [(p, label, split[k % 12]) for k, (p, label, split) in enumerate(rows)]
    phone = shop / "phone" / "phone_000.png"
    (tmp_path / "links").mkdir()
    (tmp_path / "links" / "soft.png").symlink_to(phone)
    os.link(phone, tmp_path / "links" / "hard.png")
    again = [
        ("./shop/phone/phone_000.png", "phone", "test"),
        (str(phone), "phone", "val"),  # absolute
        ("shop/shirt/../phone/phone_000.png", "phone", "test"),
        ("links/soft.png", "phone", "test"),
        ("links/hard.png", "phone", "train"),
    ]
    manifest = write_csv(tmp_path / "styles.csv", rows + again, header=("path", "label", "split"))
    dm = ready(ManifestDataModule(str(manifest), INPUT_32, split_column="split"))
    splits = {s: {p.resolve() for p in files_in(dm, s)} for s in ("train", "val", "test")}
    assert phone.resolve() in splits["train"]
    assert phone.resolve() not in splits["val"] | splits["test"]
    assert {s: len(v) for s, v in splits.items()} == {"train": 24, "val": 6, "test": 6}
    assert sum(len(dm.splits[s]) for s in splits) == 36  # each file once, no second copy under a new name
    repeated = {f"{manifest} row {k} (line {k + 1})" for k in range(37, 42)}
    assert set(dm.skipped) == repeated
    assert dm.skipped[f"{manifest} row 37 (line 38)"] == (
        f"the same file as row 1 (line 2): {phone}, used once (this row says test; kept in train)"
    )
    warning = "5 rows name a file an earlier row names, 4 of them for another split"
    assert warning in caplog.text
    assert "row 37 (line 38) = row 1 (line 2)" in caplog.text


def test_files_listed_twice_without_a_split_column_land_in_one_split(tmp_path, shop, caplog):
    """Every row twice (once with ./): a split by fractions must still hold each file in one split."""
    rows = shop_rows(shop)
    manifest = write_csv(tmp_path / "styles.csv", rows + [(f"./{p}", label) for p, label in rows])
    dm = ready(ManifestDataModule(str(manifest), INPUT_32))
    splits = [files_in(dm, s) for s in ("train", "val", "test")]
    assert [len(s) for s in splits] == [30, 3, 3]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    assert len(dm.skipped) == 36 and "36 rows name a file an earlier row names;" in caplog.text


def test_the_same_file_under_two_labels_names_both_rows(tmp_path, shop):
    rows = shop_rows(shop) + [("./shop/phone/phone_003.jpg", "shirt")]
    manifest = write_csv(tmp_path / "styles.csv", rows)
    with pytest.raises(
        SkuvisionError,
        match=(
            r"^.*styles\.csv: row 4 \(line 5\) \(label='phone'\) and row 37 \(line 38\) \(label='shirt'\) "
            r"name the same file .*shop/phone/phone_003\.jpg; a file has one label"
        ),
    ):
        ready(ManifestDataModule(str(manifest), INPUT_32))


def test_labels_that_differ_only_in_case_are_refused_with_their_counts(tmp_path, shop):
    rows = shop_rows(shop)
    rows[30] = (rows[30][0], "Toaster")  # one of the 12 toasters, as a second spelling
    manifest = write_csv(tmp_path / "styles.csv", rows)
    dm = ManifestDataModule(str(manifest), INPUT_32)
    with pytest.raises(
        SkuvisionError,
        match=(
            r"styles\.csv: label values 'toaster' \(11 rows: row 25 \(line 26\), row 26 \(line 27\), row 27 "
            r"\(line 28\), \.\.\.\) and 'Toaster' \(1 row: row 31 \(line 32\)\) differ only in case"
        ),
    ):
        _ = dm.class_names  # before any image is read


def test_surrounding_spaces_are_removed_from_labels_and_said(tmp_path, shop, caplog):
    rows = shop_rows(shop)
    rows[0] = (rows[0][0], "phone ")
    rows[1] = (rows[1][0], " phone")
    rows[2] = (rows[2][0], "phone ")
    manifest = write_csv(tmp_path / "styles.csv", rows)
    assert ",phone \n" in manifest.read_text()  # the file really holds the spaces
    dm = ready(ManifestDataModule(str(manifest), INPUT_32))
    assert dm.class_names == ["phone", "shirt", "toaster"]
    assert dm.class_counts()["train"] == [10, 10, 10]
    assert (
        "3 values of label had surrounding spaces, removed: 'phone ' -> 'phone' (2 rows), ' phone' -> "
        in (caplog.text)
    )


def test_training_on_a_manifest_writes_the_skipped_rows(tmp_path, data_root, monkeypatch):
    monkeypatch.setenv("SKUVISION_CACHE", str(tmp_path / "cache"))
    manifest = data_root / "catalogue" / "styles.csv"
    table = pd.read_csv(manifest)
    table.loc[len(table)] = ["../photos/phone/missing.jpg", "phone"]
    table.loc[len(table)] = ["./" + table.iloc[0]["path"], table.iloc[0]["label"]]  # a row listed twice
    (tmp_path / "catalogue").mkdir()
    table.to_csv(tmp_path / "catalogue" / "styles.csv", index=False)
    (tmp_path / "photos").symlink_to(data_root / "photos")  # ../photos/... resolves beside catalogue/
    cfg = compose_cfg(
        "train",
        quick_overrides("manifest", data_root)
        + [
            f"data.root={tmp_path / 'catalogue' / 'styles.csv'}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "data.cache=true",  # the file sources' decoded-image cache serves a manifest's files too
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    skipped = json.loads((tmp_path / "run" / "skipped_images.json").read_text())
    assert sorted(Path(p).name for p in skipped) == ["missing.jpg", "styles.csv row 38 (line 39)"]
    assert skipped[f"{tmp_path / 'catalogue' / 'styles.csv'} row 38 (line 39)"].startswith(
        "the same file as row 1 (line 2):"
    )
    counts = json.loads((tmp_path / "run" / "class_counts.json").read_text())
    assert sum(sum(split.values()) for split in counts.values()) == 36
    assert any((tmp_path / "cache" / "decoded").rglob("*")), "the decoded-image cache was not used"


@pytest.fixture
def products(tmp_path) -> list[tuple[str, str]]:
    """(id, articleType) of 60 products, 20 per class, their JPEGs at tmp_path/images/<id>.jpg."""
    return write_product_images(tmp_path / "images", {"Shirts": 20, "Tshirts": 20, "Watches": 20})


def test_a_path_pattern_builds_each_rows_path_from_its_columns(tmp_path, products):
    """The pattern wins over a path column; a row whose id is empty is skipped, naming the column."""
    rows = [(f"elsewhere/{id_}.png", id_, article) for id_, article in products] + [("x.png", "", "Shirts")]
    manifest = write_csv(tmp_path / "styles.csv", rows, header=("path", "id", "articleType"))
    dm = ready(
        ManifestDataModule(
            str(manifest), INPUT_32, label_column="articleType", path_pattern="images/{id}.jpg"
        )
    )
    assert set().union(*(files_in(dm, s) for s in dm.splits)) == {
        tmp_path / "images" / f"{id_}.jpg" for id_, _ in products
    }
    assert dm.skipped == {f"{manifest} row 61 (line 62)": "empty id (data.path_pattern=images/{id}.jpg)"}


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        (
            "images/{sku}.jpg",
            r"names sku, which is not a column of .*styles\.csv; its columns: id, articleType$",
        ),
        ("images/{}.jpg", r"is not a path pattern \(name a column in each pair of braces\); name columns in"),
        ("images/all.jpg", r"is not a path pattern \(name a column in each pair of braces\)"),
        ("images/{id.jpg", r"is not a path pattern \(expected '}' before end of string\)"),
        (
            "images/{id:05d}.jpg",
            r"is not a path pattern \(Unknown format code 'd' .*\); name columns in braces, cells",
        ),
    ],
    ids=[
        "a column the table lacks",
        "a positional field",
        "no field",
        "an unclosed brace",
        "a number format",
    ],
)
def test_a_path_pattern_that_cannot_name_files_is_refused(tmp_path, pattern, message):
    manifest = write_csv(tmp_path / "styles.csv", [("1000", "Shirts")], header=("id", "articleType"))
    dm = ManifestDataModule(str(manifest), INPUT_32, label_column="articleType", path_pattern=pattern)
    with pytest.raises(SkuvisionError, match=rf"^data\.path_pattern={re.escape(pattern)} {message}"):
        _ = dm.class_names


@pytest.mark.parametrize(
    ("pattern", "cell"),
    [
        ("images/{id}.jpg", "../secret"),
        ("images/{id}.jpg", "../../etc/passwd"),
        ("images/{id}.jpg", "a/../../secret"),
        ("images/{id}.jpg", "x\0y"),
        ("{id}.jpg", "/etc/passwd"),
        ("{id}.jpg", "~root/.ssh/id_rsa"),
    ],
)
def test_a_cell_that_leads_out_of_the_pattern_folder_is_refused_naming_its_line(tmp_path, pattern, cell):
    """A cell is data (an export's id), not a path: whatever it holds, the row's file stays in the folder the
    pattern names. (A path column's absolute or `..` path is the manifest owner's own choice, and stays.)"""
    (tmp_path / "secret.jpg").write_bytes(b"outside images/")
    (tmp_path / "cat").mkdir()
    manifest = write_csv(
        tmp_path / "cat" / "styles.csv", [("1000", "Shirts"), (cell, "Watches")], header=("id", "articleType")
    )
    dm = ManifestDataModule(str(manifest), INPUT_32, label_column="articleType", path_pattern=pattern)
    with pytest.raises(SkuvisionError, match=r"styles\.csv row 2 \(line 3\): its cells .* outside .*/cat/"):
        ready(dm)


def test_a_cell_with_a_slash_inside_the_pattern_stays_in_its_folder(tmp_path):
    """`images/{id}` with the cell `/etc/passwd` names images/etc/passwd: inside the folder, so allowed."""
    rows = [("/etc/passwd", "Shirts"), ("/etc/hosts", "Watches")]
    manifest = write_csv(tmp_path / "styles.csv", rows, header=("id", "articleType"))
    dm = ManifestDataModule(str(manifest), INPUT_32, label_column="articleType", path_pattern="images/{id}")
    assert dm.raw_paths == ["images//etc/passwd", "images//etc/hosts"]
    with pytest.raises(SkuvisionError, match=r"no readable training images"):
        ready(dm)  # images/etc/passwd does not exist: /etc/passwd was not read


def test_a_pattern_may_name_a_folder_of_its_own_and_subfolders_from_cells(tmp_path, products):
    """The pattern itself is config, like a path column: `../` or an absolute start is its owner's choice;
    a cell may name a subfolder of it."""
    (tmp_path / "cat").mkdir()
    manifest = write_csv(
        tmp_path / "cat" / "styles.csv",
        [(f"{id_[:2]}/{id_}", article) for id_, article in products],
        header=("id", "articleType"),
    )
    for id_, _ in products:
        (tmp_path / "images" / id_[:2]).mkdir(exist_ok=True)
        os.link(tmp_path / "images" / f"{id_}.jpg", tmp_path / "images" / id_[:2] / f"{id_}.jpg")
    for pattern in ("../images/{id}.jpg", f"{tmp_path}/images/{{id}}.jpg"):
        dm = ready(
            ManifestDataModule(str(manifest), INPUT_32, label_column="articleType", path_pattern=pattern)
        )
        assert len(set().union(*(files_in(dm, s) for s in dm.splits))) == len(products)


def test_the_path_pattern_is_a_key_of_data_manifest(tmp_path, data_root):
    manifest = write_csv(
        tmp_path / "styles.csv", [("1000", "Shirts"), ("1001", "Watches")], header=("id", "type")
    )
    overrides = [f"data.root={manifest}", "data.label_column=type", 'data.path_pattern="images/{id}.jpg"']
    cfg = compose_cfg("train", quick_overrides("manifest", data_root) + overrides, tmp_path / "run")
    assert data_module(cfg.data, INPUT_32).raw_paths == ["images/1000.jpg", "images/1001.jpg"]


def write_export(path: Path, lines: list[str], end: str = "\r\n") -> Path:
    """A CSV as a Windows export writes it: a BOM, CRLF line ends, each line as given (none quoted for it)."""
    path.write_bytes(codecs.BOM_UTF8 + "".join(line + end for line in lines).encode())
    return path


HEADER = "id,gender,articleType,productDisplayName"


def test_an_export_with_broken_lines_trains_on_the_rest_and_names_each_by_its_line(
    tmp_path, products, caplog
):
    """A BOM, CRLF, a display name spanning two lines, a blank line, and three broken lines (3 of 65 data
    lines: under 5%)."""
    good = [f"{id_},Men,{article},{article} {id_}" for id_, article in products]
    id_, article = products[10]
    lines = [
        HEADER,  # line 1, after the BOM
        *good[:5],  # lines 2-6
        "9001,Men,Shirts,Turtle Check Men Navy Blue Shirt, slim fit",  # 7: an unquoted comma
        *good[5:10],  # 8-12
        f'{id_},Men,{article},"Printed shirt\r\nwith a second line"',  # 13-14: one quoted value
        *good[11:20],  # 15-23
        "9002,Men,Watches",  # 24: too few fields
        *good[20:],  # 25-64
        "",  # 65
        "9003,Men,Watches,Titan Watch",  # 66: readable, its image missing
        '9004,Men,Shirts,"Unclosed name',  # 67: a quote never closed
    ]
    manifest = write_export(tmp_path / "styles.csv", lines)
    dm = ready(
        ManifestDataModule(
            str(manifest), INPUT_32, label_column="articleType", path_pattern="images/{id}.jpg"
        )
    )
    assert dm.skipped == {
        f"{manifest} line 7": "5 fields where the header has 4",
        f"{manifest} line 24": "3 fields where the header has 4",
        f"{manifest} line 67": "the quote opened on line 67 never closes",
        str(tmp_path / "images" / "9003.jpg"): f"file not found ({manifest} row 61 (line 66))",
    }
    assert f"skipping {manifest} line 7 (5 fields where the header has 4)" in caplog.text
    assert dm.class_names == ["Shirts", "Tshirts", "Watches"]  # no "\r", and the BOM left `id` a column
    used = set().union(*(files_in(dm, s) for s in dm.splits))
    assert used == {tmp_path / "images" / f"{id_}.jpg" for id_, _ in products}
    assert sum(len(dm.splits[s]) for s in dm.splits) == 60
    assert dm.row_place(10) == "row 11 (line 13)" and dm.row_place(11) == "row 12 (line 15)"
    assert dm.table.at[10, "productDisplayName"] == "Printed shirt\r\nwith a second line"


@pytest.mark.parametrize("end", ["\r\n", "\n", "\r"], ids=["CRLF", "LF", "CR"])
def test_a_bom_and_line_ends_stay_out_of_the_values(tmp_path, end):
    lines = [
        "id,articleType,baseColour",
        "1,Shirts,Navy Blue",
        "",
        "   ",
        f'2,Watches,"Black{end}Steel"',
        "3,Shirts,",
    ]
    read = read_table(write_export(tmp_path / "styles.csv", lines, end))
    assert list(read.rows.columns) == ["id", "articleType", "baseColour"]
    assert read.rows.to_numpy().tolist() == [
        ["1", "Shirts", "Navy Blue"],
        ["2", "Watches", f"Black{end}Steel"],  # a quoted line break is the value's own
        ["3", "Shirts", ""],
    ]
    assert read.lines == [2, 5, 7] and read.malformed == {}  # blank lines are no rows, nor broken ones


def data_lines(broken: dict[int, str], count: int = 20) -> list[str]:
    """A header and `count` data lines of two classes, the lines numbered in `broken` replaced."""
    lines = [HEADER] + [f"{1000 + k},Men,{('Shirts', 'Watches')[k % 2]},Item {k}" for k in range(count)]
    for number, line in broken.items():
        lines[number - 1] = line
    return lines


@pytest.mark.parametrize("count", [20, 5], ids=["5% of the lines", "a single line"])
def test_one_broken_line_is_skipped(tmp_path, count):
    """1 of 20 lines is 5%, and one line of a short table is one line: a typo, not a broken export."""
    manifest = write_export(tmp_path / "styles.csv", data_lines({5: "1003,Men,Shirts,Navy, slim"}, count))
    dm = ManifestDataModule(str(manifest), INPUT_32, label_column="articleType", path_pattern="{id}.jpg")
    assert dm.class_names == ["Shirts", "Watches"]
    assert dm.malformed_lines() == {f"{manifest} line 5": "5 fields where the header has 4"}
    assert len(dm.table) == count - 1 and dm.row_place(3) == "row 4 (line 6)"


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        (
            {5: "1003,Men,Shirts,Navy, slim", 12: "1010,Men"},
            r"2 of 20 data lines are malformed \(more than 5%\): line 5 \(5 fields where the header has 4\), "
            r"line 12 \(2 fields where the header has 4\); quote every value that holds a comma",
        ),
        (
            {5: '1003,Men,Shirts,"Navy'},
            r"17 of 20 data lines are malformed \(more than 5%\): line 5 \(the quote opened on line 5 never "
            r"closes: lines 5-21 were read as one value\); quote every value .* close every quote",
        ),
        (
            {5: '1003,Men,"Shirts\r\nand more","Navy'},
            r"18 of 21 data lines are malformed .*: line 5 \(the quote opened on line 6 never closes: lines "
            r"6-22 were read",
        ),
    ],
    ids=["two broken lines", "a quote never closed", "a quote opened on a record's second line"],
)
def test_an_export_with_too_many_broken_lines_is_refused(tmp_path, broken, message):
    manifest = write_export(tmp_path / "styles.csv", data_lines(broken))
    dm = ManifestDataModule(str(manifest), INPUT_32, label_column="articleType", path_pattern="{id}.jpg")
    with pytest.raises(SkuvisionError, match=rf"^{re.escape(str(manifest))}: {message}"):
        _ = dm.class_names


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"styles\.csv is empty: a manifest's first line names its columns"),
        (
            b"id,label,label\n1,a,b\n",
            r"styles\.csv: the header names 'label' more than once; give each column",
        ),
        (
            b'"id"x,label\n1,a\n',
            r"styles\.csv line 1: the header is not readable CSV \(.*\); fix its quoting",
        ),
        (
            b"id,label\n1,shirt\n2,caf\xe9\n",
            r"styles\.csv line 3 is not UTF-8 text \(.*\); export the table as UTF-8",
        ),
    ],
    ids=["empty", "a column twice", "a broken header", "not UTF-8"],
)
def test_an_unreadable_csv_is_named(tmp_path, content, message):
    (tmp_path / "styles.csv").write_bytes(content)
    with pytest.raises(SkuvisionError, match=message):
        _ = ManifestDataModule(str(tmp_path / "styles.csv"), INPUT_32).class_names


@pytest.mark.parametrize("label_column", ["articleType", "baseColour"])
def test_surrounding_spaces_are_removed_from_every_column(tmp_path, label_column):
    lines = [
        "id,articleType,baseColour",
        "1000 ,Shirts ,Navy Blue ",
        " 1001, Watches, Black",
        "1002,Shirts,Black  ",
    ]
    dm = ManifestDataModule(
        str(write_export(tmp_path / "styles.csv", lines)),
        INPUT_32,
        label_column=label_column,
        path_pattern="images/{id}.jpg",
    )
    assert (
        dm.class_names
        == {"articleType": ["Shirts", "Watches"], "baseColour": ["Black", "Navy Blue"]}[label_column]
    )
    assert dm.raw_paths == ["images/1000.jpg", "images/1001.jpg", "images/1002.jpg"]
