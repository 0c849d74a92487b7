"""A page a person looks at: images with what the model said, as one self-contained HTML file, and a PNG
contact sheet of the first ones.

predict.py writes predictions.html (doubtful first: review-flagged, then lowest confidence) and eval.py
writes errors.html (its most confident mistakes first) with the same writer. The page needs nothing but
itself: thumbnails are small JPEGs in data: URIs, CSS and the sorting script inline, and its
Content-Security-Policy allows no other source (so even a name that slipped through escaping could fetch
nothing and run no script of its own: the one script allowed is named by its hash). Every text is escaped.

A tile may carry extra pictures (predict.py's `explanation` column: a Grad-CAM overlay under the run folder),
shown small beside the thumbnail. The page holds at most `max_images` tiles, in the order given, and says how
many were left out.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from skuvision.data.decode import DECODE_ERRORS, open_rgb, pixel_budget, short_reason
from skuvision.errors import SkuvisionError
from skuvision.models.heads import Head
from skuvision.outputs import new_file
from skuvision.plots import plt, save_new

log = logging.getLogger("skuvision")

Picture = Path | Callable[[], Image.Image]
EXPLANATION = "explanation"  # predict.py's CSV column: an overlay's path relative to the run folder
JPEG_QUALITY = 75
# The contact sheet, in pixels: a cell is the thumbnail (at least this wide) over two lines of caption.
SHEET_DPI = 100
SHEET_CELL_WIDTH = 140
SHEET_CAPTION = 44
SHEET_TITLE = 30


@dataclass
class Answer:
    """What one head said of one image: (label, probability) best first (a tag column: its predicted tags;
    `kind` "truth": the true label, probability None); `review` where a threshold sends it to a person."""

    column: str
    kind: str
    ranked: list[tuple[str, float | None]]
    review: bool | None = None


@dataclass
class Tile:
    """One image of the page: its name (a path), its picture (a file, or a function giving a PIL image,
    called only if the tile is shown), the heads' answers, why it could not be read, extra pictures by title,
    and notes."""

    name: str
    picture: Picture | None
    answers: list[Answer]
    error: str = ""
    extras: dict[str, Picture] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def review(self) -> bool:
        return bool(self.error) or any(a.review for a in self.answers)

    @property
    def confidence(self) -> float:
        """The lowest top-1 probability over the label columns (-1 for an unreadable image)."""
        tops = [a.ranked[0][1] for a in self.answers if a.kind == "label" and a.ranked]
        return -1.0 if self.error or not tops else min(tops)

    @property
    def label(self) -> str:
        """The first label column's top-1 label: what 'sort by label' sorts by."""
        return next((a.ranked[0][0] for a in self.answers if a.kind == "label" and a.ranked), "")

    def caption(self) -> str:
        if self.error:
            return "unreadable"
        truth = next((a.ranked[0][0] for a in self.answers if a.kind == "truth"), None)
        said = f"{self.label} {self.confidence:.0%}"
        return (f"true: {truth}\n" if truth is not None else "") + said + (" (review)" if self.review else "")


@dataclass(frozen=True)
class GalleryOptions:
    max_images: int = 1000
    thumb_px: int = 96
    sheet_images: int = 48


def gallery_options(cfg, key: str = "gallery") -> GalleryOptions | None:
    """The task config's `gallery` section (None when gallery=false), checked before any work."""
    section = cfg.get(key, {})
    if section is False or section is None:
        return None
    if section is True:
        section = {}
    if not hasattr(section, "get"):
        raise SkuvisionError(f"{key}={section}: give {key}=false, or keys such as {key}.max_images=1000")
    known = set(GalleryOptions.__dataclass_fields__)
    unknown = sorted(set(section) - known)
    if unknown:
        raise SkuvisionError(f"{key}.{unknown[0]} is not a gallery key: use {', '.join(sorted(known))}")
    options = GalleryOptions(**dict(section))
    for name in known:
        value, least = getattr(options, name), 16 if name == "thumb_px" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise SkuvisionError(f"{key}.{name}={value}: give a whole number, {least} or more")
    return options


def doubtful_first(tiles: Iterable[Tile]) -> list[Tile]:
    """Unreadable and review-flagged first, then by lowest confidence; ties keep their input order."""
    return sorted(tiles, key=lambda t: (not t.review, t.confidence))


def tiles_from_predictions(
    header: list[str], rows: list[list[str]], heads: list[Head], separator: str, run_folder: Path
) -> list[Tile]:
    """The tiles of predictions.csv's rows, read back by column name, so the page shows what the CSV says:
    the one-label model's label_i/prob_i pairs and `review`, or per head `<column>`, `<column>_prob` and
    `<column>_review` (a tag column: `<column>` and `<column>_probs`, joined by `separator`). An `explanation`
    column names an overlay under `run_folder`."""
    tiles = []
    for row in rows:
        cells = dict(zip(header, row, strict=True))
        answers = []
        if not any(h.column for h in heads):  # the one-label model
            ranked, i = [], 1
            while f"label_{i}" in cells:
                if cells[f"label_{i}"] or cells[f"prob_{i}"]:
                    ranked.append((cells[f"label_{i}"], float(cells[f"prob_{i}"])))
                i += 1
            review = cells["review"] == "true" if "review" in cells else None
            answers.append(Answer("", "label", ranked, review))
        else:
            for head in heads:
                value = cells[head.column]
                if head.kind == "tags":
                    probs = cells[f"{head.column}_probs"]
                    pairs = zip(value.split(separator), probs.split(separator), strict=True) if value else []
                    answers.append(Answer(head.column, "tags", [(t, float(p)) for t, p in pairs]))
                else:
                    ranked = [(value, float(cells[f"{head.column}_prob"]))] if value else []
                    review_cell = cells.get(f"{head.column}_review")
                    answers.append(
                        Answer(
                            head.column,
                            "label",
                            ranked,
                            None if review_cell is None else review_cell == "true",
                        )
                    )
        extras, notes = {}, []
        if cells.get(EXPLANATION):
            overlay, why = inside(run_folder, cells[EXPLANATION])
            if overlay is not None:
                extras["explanation"] = overlay
            else:
                notes.append(why)
        tiles.append(Tile(cells["path"], Path(cells["path"]), answers, cells["error"], extras, notes))
    return tiles


def inside(folder: Path, relative: str) -> tuple[Path | None, str]:
    """`folder / relative` when it is a file inside `folder` (links resolved), else None and why."""
    root = Path(folder).resolve()
    path = (root / relative).resolve()
    if Path(relative).is_absolute() or not path.is_relative_to(root):
        log.warning("gallery: explanation %r is outside the run folder %s: not shown", relative, root)
        return None, f"explanation {relative!r} is outside the run folder: not shown"
    if not path.is_file():
        return None, f"explanation {relative!r} is missing"
    return path, ""


def thumbnail(picture: Picture, px: int) -> Image.Image:
    """The picture at most `px` on its longer side, RGB; a JPEG file is decoded at a reduced scale."""
    if isinstance(picture, Path):
        img = open_rgb(picture, min_side=px, max_pixels=pixel_budget(px))
    else:
        img = picture().convert("RGB")
    img.thumbnail((px, px))
    return img


def data_uri(img: Image.Image) -> str:
    buffer = io.BytesIO()
    img.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def picture_or_error(picture: Picture | None, px: int) -> tuple[Image.Image | None, str]:
    if picture is None:
        return None, ""
    try:
        return thumbnail(picture, px), ""
    except DECODE_ERRORS as err:
        return None, short_reason(err)


SCRIPT = """
const box = document.getElementById("tiles");
const tiles = Array.from(box.children);
const sortBy = document.getElementById("sort");
const filterBy = document.getElementById("filter");
const keys = {
  page: (t) => +t.dataset.order,
  "confidence-up": (t) => +t.dataset.confidence,
  "confidence-down": (t) => -t.dataset.confidence,
  label: (t) => t.dataset.label,
};
function show() {
  const key = keys[sortBy.value];
  const want = filterBy.value;
  const order = tiles.slice().sort((a, b) => {
    const x = key(a), y = key(b);
    if (x < y) return -1;
    if (x > y) return 1;
    return +a.dataset.order - +b.dataset.order;
  });
  let shown = 0;
  for (const t of order) {
    t.hidden = want !== "" && !JSON.parse(t.dataset.labels).includes(want);
    shown += t.hidden ? 0 : 1;
    box.appendChild(t);
  }
  document.getElementById("shown").textContent = shown;
}
sortBy.addEventListener("change", show);
filterBy.addEventListener("change", show);
"""

STYLE = """
body { font: 13px system-ui, sans-serif; margin: 1em; color: #222; }
#tiles { display: flex; flex-wrap: wrap; gap: 8px; }
figure { margin: 0; padding: 6px; border: 1px solid #ccc; border-radius: 4px; width: max-content; }
figure.review { border: 2px solid #d9822b; background: #fff7ee; }
figure img { display: inline-block; vertical-align: top; image-rendering: auto; }
figure img.extra { margin-left: 4px; }
.name { max-width: 220px; overflow-wrap: anywhere; font-size: 11px; color: #555; }
.flag { color: #b35c00; font-weight: bold; }
.error, .note { color: #a00; max-width: 220px; overflow-wrap: anywhere; }
table { border-collapse: collapse; font-size: 12px; }
td, th { padding: 0 4px; text-align: left; vertical-align: top; }
th { color: #666; font-weight: normal; }
"""


def e(text) -> str:
    return html.escape(str(text), quote=True)


def answer_rows(tile: Tile) -> str:
    rows = []
    for answer in tile.answers:
        column = e(answer.column or ("label" if answer.kind == "label" else answer.kind))
        if answer.kind == "truth":
            name = f"{column} true" if answer.column else "true"
            rows.append(f"<tr class=truth><th>{name}</th><td>{e(answer.ranked[0][0])}</td><td></td></tr>")
            continue
        flag = " <span class=flag>review</span>" if answer.review else ""
        shown = answer.ranked or [("(none)" if answer.kind == "tags" else "", None)]
        for i, (label, prob) in enumerate(shown):
            head = f"{column}{flag}" if i == 0 else ""
            p = "" if prob is None else f"{prob:.1%}"
            rows.append(f"<tr><th>{head}</th><td class=label>{e(label)}</td><td class=prob>{p}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def tile_html(tile: Tile, order: int, px: int) -> tuple[str, Image.Image | None]:
    """One <figure> and its thumbnail (for the contact sheet)."""
    image, problem = picture_or_error(None if tile.error else tile.picture, px)
    parts = []
    if image is not None:
        parts.append(
            f'<img class=thumb src="{data_uri(image)}" width={image.width} height={image.height} '
            f'alt="{e(tile.name)}">'
        )
    for title, extra in tile.extras.items():
        overlay, why = picture_or_error(extra, px)
        if overlay is None:
            parts.append(f"<div class=note>{e(title)}: {e(why)}</div>")
        else:
            parts.append(
                f'<img class=extra data-kind="{e(title)}" src="{data_uri(overlay)}" width={overlay.width} '
                f'height={overlay.height} alt="{e(title)}" title="{e(title)}">'
            )
    labels = sorted({label for a in tile.answers if a.kind == "label" for label, _ in a.ranked[:1]})
    error = tile.error or problem
    caption = [f'<div class=name title="{e(tile.name)}">{e(short_name(tile.name))}</div>']
    caption += [f"<div class=error>unreadable: {e(error)}</div>"] if error else [answer_rows(tile)]
    caption += [f"<div class=note>{e(note)}</div>" for note in tile.notes]
    attributes = (
        f'class="tile{" review" if tile.review else ""}" data-order={order} '
        f'data-confidence="{tile.confidence:.6f}" data-label="{e(tile.label)}" '
        f'data-labels="{e(json.dumps(labels))}"'
    )
    figure = f"<figure {attributes}>{''.join(parts)}<figcaption>{''.join(caption)}</figcaption></figure>\n"
    return figure, image


def short_name(name: str, width: int = 40) -> str:
    tail = name.replace("\\", "/").rsplit("/", 1)[-1]
    return tail if len(tail) <= width else "…" + tail[-width + 1 :]


def write_gallery(
    path: Path, title: str, tiles: Sequence[Tile], options: GalleryOptions, summary: str = ""
) -> list[Image.Image | None]:
    """The page at `path` (a new file): the first options.max_images tiles in the order given. Returns the
    thumbnails of the first options.sheet_images tiles (None where there is no picture), for the sheet."""
    shown = tiles[: options.max_images]
    left_out = len(tiles) - len(shown)
    script_hash = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    policy = (
        f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    )
    labels = sorted(
        {label for t in shown for a in t.answers if a.kind == "label" for label, _ in a.ranked[:1]}
    )
    counts = f"{len(tiles)} image(s); <span id=shown>{len(shown)}</span> shown"
    if left_out:
        counts += (
            f"; {left_out} left out (the page holds the first {options.max_images}: "
            "raise gallery.max_images to see more, or read the CSV)"
        )
    head = (
        "<!doctype html>\n<html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">'
        f"<title>{e(title)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>{e(title)}</h1>\n<p class=summary>{e(summary)}</p>\n<p class=counts>{counts}</p>\n"
        "<p class=controls><label>sort <select id=sort><option value=page selected>as listed</option>"
        "<option value=confidence-up>confidence, lowest first</option>"
        "<option value=confidence-down>confidence, highest first</option>"
        "<option value=label>label, A to Z</option></select></label> "
        '<label>label <select id=filter><option value="">all</option>'
        + "".join(f'<option value="{e(label)}">{e(label)}</option>' for label in labels)
        + "</select></label></p>\n<div id=tiles>\n"
    )
    thumbs = []
    with new_file(path) as partial, open(partial, "w", encoding="utf-8") as f:
        f.write(head)
        for order, tile in enumerate(shown):
            figure, image = tile_html(tile, order, options.thumb_px)
            f.write(figure)
            if order < options.sheet_images:
                thumbs.append(image)
        f.write(f"</div>\n<script>{SCRIPT}</script>\n</body></html>\n")
    return thumbs


def contact_sheet_png(
    path: Path,
    tiles: Sequence[Tile],
    thumbs: Sequence[Image.Image | None],
    title: str,
    px: int,
    cols: int = 8,
) -> Path:
    """A grid of the thumbnails in the page's order, each with its name and caption under it. The grid is
    pasted at its own pixels as one figure image (subplots per image took seconds for 48)."""
    n = max(1, len(thumbs))
    cols = min(cols, n)
    rows = -(-n // cols)
    cell_w, cell_h, top = max(px, SHEET_CELL_WIDTH), px + SHEET_CAPTION, SHEET_TITLE
    width, height = cols * cell_w, top + rows * cell_h
    canvas = Image.new("RGB", (width, height), "white")
    fig = plt.figure(figsize=(width / SHEET_DPI, height / SHEET_DPI), dpi=SHEET_DPI)
    for k, (tile, image) in enumerate(zip(tiles, thumbs, strict=True)):
        row, col = divmod(k, cols)
        x0, y0 = col * cell_w, top + row * cell_h
        if image is not None:
            canvas.paste(image, (x0 + (cell_w - image.width) // 2, y0 + (px - image.height) // 2))
        text = short_name(tile.name, 22) + "\n" + tile.caption()
        colour = "#b35c00" if tile.review else "black"
        x, y = (x0 + cell_w / 2) / width, 1 - (y0 + px + 2) / height
        fig.text(x, y, text, ha="center", va="top", fontsize=6.5, color=colour, parse_math=False)
    fig.figimage(np.asarray(canvas), 0, 0, origin="upper", zorder=0)
    fig.text(0.5, 1 - 6 / height, title if thumbs else f"{title}: no images", ha="center", va="top",
             fontsize=9, parse_math=False)  # fmt: skip
    return save_new(fig, path, SHEET_DPI)


def write_gallery_and_sheet(
    html_path: Path, png_path: Path | None, title: str, tiles: Sequence[Tile], options: GalleryOptions,
    summary: str = "",
) -> None:  # fmt: skip
    thumbs = write_gallery(html_path, title, tiles, options, summary)
    if png_path is not None:
        contact_sheet_png(png_path, tiles[: len(thumbs)], thumbs, title, options.thumb_px)
