"""Writing results: nothing an earlier run wrote is replaced, no file is ever half-written, and CSV cells do
not run as spreadsheet formulas.

Every result is written under a temporary name in its own folder and then given its name in one step that
fails if the name is taken (a hard link; a rename where the file system has none), so a crash leaves at most
a hidden `.<name>.<random>.partial*` file and a second run into the same place is refused.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from skuvision.errors import SkuvisionError

# OWASP's CSV-injection rule: a cell starting with one of these runs as a formula in a spreadsheet.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
ESCAPE = "'"
# A plain negative number is not a formula and stays a number.
PLAIN_NUMBER = re.compile(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def spreadsheet_cell(value):
    """`value` as a CSV cell a spreadsheet shows as text: a string starting with a formula character (or with
    the escape quote itself, so that the rule can be undone exactly) gets a leading `'`."""
    if not isinstance(value, str) or not value.startswith((*FORMULA_STARTS, ESCAPE)):
        return value
    return value if PLAIN_NUMBER.fullmatch(value) else ESCAPE + value


def from_spreadsheet_cell(text: str) -> str:
    """The inverse of spreadsheet_cell for a cell read back as a string."""
    return text[1:] if text.startswith(ESCAPE) else text


def taken(path: Path) -> bool:
    """Whether a run has already put something at `path` (an empty folder holds nothing)."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return os.path.lexists(path)


def refuse_existing(paths: Iterable[Path], fix: str) -> None:
    """Before any work: refuse, naming the first, when an earlier run already wrote one of `paths`."""
    for path in paths:
        if taken(path):
            what = "exists and is not empty" if Path(path).is_dir() else "exists"
            raise SkuvisionError(f"{path} {what} (an earlier result): nothing was written; {fix}")


def partial_name(path: Path) -> Path:
    """A free hidden name beside `path` that keeps its suffix (writers such as numpy and matplotlib read the
    format from it)."""
    return path.with_name(f".{path.stem}.{secrets.token_hex(4)}.partial{path.suffix}")


def sync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(written: Path, path: Path) -> None:
    """Give the complete file `written` the name `path`, refusing if that name is taken."""
    sync(written)
    try:
        os.link(written, path)
    except FileExistsError:
        raise SkuvisionError(f"{path} appeared while this run wrote it: kept, nothing replaced") from None
    except OSError as err:  # a file system without hard links
        if err.errno == errno.EEXIST or os.path.lexists(path):
            raise SkuvisionError(f"{path} appeared while this run wrote it: kept, nothing replaced") from None
        os.rename(written, path)
        return
    os.unlink(written)


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it: set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def ordinary_mode(path: Path) -> None:
    """The mode any file the user writes gets (0666 less the umask): some writers (safetensors) create
    their file private (0600) through a temporary file, which a served or shipped folder should not keep."""
    mode = path.stat().st_mode
    os.chmod(path, (0o666 | (mode & 0o111)) & ~current_umask())


@contextmanager
def new_file(path) -> Iterator[Path]:
    """A temporary path to write `path`'s content to; named `path` when the block ends without an error,
    removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if taken(path):
        raise SkuvisionError(f"{path} exists (an earlier result): not replaced; remove it or write elsewhere")
    partial = partial_name(path)
    try:
        yield partial
        publish_file(partial, path)
    finally:
        if os.path.lexists(partial):
            os.unlink(partial)


@contextmanager
def new_file_with_companions(path) -> Iterator[Path]:
    """As new_file, for a writer that puts files beside its file and names them after it (ONNX's external
    weights, `<name>.data`, which the model names): the block writes `path`'s name in a temporary folder; its
    companions get their names beside `path` first, then `path` itself; a taken name or an error publishes
    nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if taken(path):
        raise SkuvisionError(f"{path} exists (an earlier result): not replaced; remove it or write elsewhere")
    partial = partial_name(path.with_suffix(""))
    partial.mkdir()
    published: list[Path] = []
    try:
        yield partial / path.name
        companions = sorted(f for f in partial.iterdir() if f.name != path.name)
        for written in [*companions, partial / path.name]:
            ordinary_mode(written)
            publish_file(written, path.with_name(written.name))
            published.append(path.with_name(written.name))
    except BaseException:
        for done in published:
            os.unlink(done)
        raise
    finally:
        shutil.rmtree(partial)


@contextmanager
def new_folder(path) -> Iterator[Path]:
    """A temporary folder to fill; renamed to `path` (which may exist only as an empty folder) when the block
    ends without an error, removed when it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if taken(path):
        raise SkuvisionError(f"{path} exists and is not empty (an earlier result): not replaced")
    partial = partial_name(path)
    partial.mkdir()
    try:
        yield partial
        for file in partial.rglob("*"):
            if file.is_file() and not file.is_symlink():
                ordinary_mode(file)
                sync(file)
        try:
            os.rename(partial, path)  # onto an empty folder or no folder; fails on anything else
        except OSError as err:
            raise SkuvisionError(f"{path} appeared while this run wrote it: kept, nothing replaced") from err
    finally:
        if partial.exists():
            shutil.rmtree(partial)


@contextmanager
def replacing_file(path) -> Iterator[Path]:
    """As new_file, for the one kind of file a run rewrites on purpose (its own, when it resumes): the
    complete new content replaces the old in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_name(path)
    try:
        yield partial
        sync(partial)
        os.replace(partial, path)
    finally:
        if os.path.lexists(partial):
            os.unlink(partial)


def write_new_text(path, text: str) -> Path:
    with new_file(path) as partial:
        partial.write_text(text)
    return Path(path)


def write_new_json(path, data: dict) -> Path:
    return write_new_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_csv(path, header: list[str], rows: Iterable[Iterable], replace: bool = False) -> Path:
    """A new CSV file of `rows` under `header`, every text cell made safe for spreadsheets. `replace`: a file
    the run rewrites on purpose (see replacing_file)."""
    with (replacing_file if replace else new_file)(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([spreadsheet_cell(h) for h in header])
        writer.writerows([spreadsheet_cell(v) for v in row] for row in rows)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    """The file's SHA-256 in hex: what ties a calibration and a served model to their checkpoint."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def unpacked_bytes(path: str | Path) -> int:
    """What an .npz (a zip) says its arrays unpack to, read before any is: the size cap of a file one of our
    tasks wrote and another reads. Raises zipfile.BadZipFile for a file that is not one."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        return sum(i.file_size for i in z.infolist())
