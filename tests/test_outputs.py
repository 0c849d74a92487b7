"""skuvision.outputs: a result is written whole under its name or not at all, never over an earlier file, and
CSV cells that a spreadsheet would run as formulas are written as text."""

import csv

import pandas as pd
import pytest

from skuvision.errors import SkuvisionError
from skuvision.outputs import from_spreadsheet_cell, new_file, new_folder, spreadsheet_cell, write_csv

# Cells a spreadsheet runs (OWASP's list: = + - @, tab, carriage return), and one starting with the escape.
FORMULAS = ['=HYPERLINK("http://example.com","click")', "+SUM(1,2)", "-x", "@x", "\tx", "\rx", "-2+3", "'q"]
# Cells that must come out as they are: plain text, a number written as text, and the awkward characters.
PLAIN = ["kettle", "1.5", "-1.5", "-2e-3", "", 'a, "b"\nc', "čaj ☕ 茶", "x=1"]


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_formula_cells_get_a_leading_quote_and_others_stay(tmp_path):
    cells = FORMULAS + PLAIN
    path = write_csv(tmp_path / "t.csv", ["name", "n"], [[cell, i] for i, cell in enumerate(cells)])
    rows = read_rows(path)
    assert rows[0] == ["name", "n"]
    assert [r[0] for r in rows[1:]] == ["'" + c for c in FORMULAS] + PLAIN
    table = pd.read_csv(path, keep_default_na=False, dtype={"name": str})
    assert table["name"].tolist() == ["'" + c for c in FORMULAS] + PLAIN
    assert table["n"].tolist() == list(range(len(FORMULAS + PLAIN)))


def test_a_negative_number_stays_a_number(tmp_path):
    path = write_csv(tmp_path / "t.csv", ["as_text", "as_float"], [["-1.5", -1.5], ["-0.000001", -1e-6]])
    assert read_rows(path)[1:] == [["-1.5", "-1.5"], ["-0.000001", "-1e-06"]]
    table = pd.read_csv(path)
    assert table.dtypes.tolist() == ["float64", "float64"] and table["as_text"].tolist() == [-1.5, -1e-6]


def test_the_escape_is_undone_exactly():
    for text in FORMULAS + PLAIN + ["''", "'", "'=x", "=", "-"]:
        assert from_spreadsheet_cell(spreadsheet_cell(text)) == text
    assert spreadsheet_cell(-1.5) == -1.5 and spreadsheet_cell(None) is None


def test_a_crash_mid_write_leaves_nothing_under_the_name(tmp_path):
    with pytest.raises(OSError, match="disk full"), new_file(tmp_path / "result.csv") as partial:
        partial.write_text("id,item\n0,")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="disk full"), new_folder(tmp_path / "index") as partial:
        (partial / "index.faiss").write_bytes(b"half")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_earlier_file_or_folder_is_never_replaced(tmp_path):
    (tmp_path / "result.csv").write_text("earlier")
    with pytest.raises(SkuvisionError, match="result.csv exists"):
        with new_file(tmp_path / "result.csv") as partial:
            partial.write_text("later")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "items.csv").write_text("earlier")
    with pytest.raises(SkuvisionError, match="index exists and is not empty"), new_folder(tmp_path / "index"):
        pass
    assert (tmp_path / "result.csv").read_text() == "earlier"
    assert (tmp_path / "index" / "items.csv").read_text() == "earlier"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["index", "items.csv", "result.csv"]


def test_a_file_that_appears_while_writing_is_kept(tmp_path):
    """The name is taken in one step that fails if it exists: a file another process wrote meanwhile stays."""
    with pytest.raises(SkuvisionError, match="appeared while this run wrote it"):
        with new_file(tmp_path / "result.csv") as partial:
            partial.write_text("mine")
            (tmp_path / "result.csv").write_text("theirs")
    assert (tmp_path / "result.csv").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["result.csv"]
