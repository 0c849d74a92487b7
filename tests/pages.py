"""Reading back a gallery page (skuvision.gallery) as a browser's parser sees it: its tiles, their pictures
and texts, every script and every attribute."""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from PIL import Image


@dataclass
class PageTile:
    attrs: dict
    name: str = ""
    images: list[dict] = field(default_factory=list)
    cells: list[list[str]] = field(default_factory=list)  # each table row's texts
    texts: list[str] = field(default_factory=list)

    @property
    def review(self) -> bool:
        return "review" in self.attrs["class"].split()

    @property
    def confidence(self) -> float:
        return float(self.attrs["data-confidence"])

    def labels(self) -> list[str]:
        return [row[1] for row in self.cells if len(row) > 1]


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tiles: list[PageTile] = []
        self.scripts: list[str] = []
        self.elements: list[tuple[str, dict]] = []
        self.meta: list[dict] = []
        self.text: list[str] = []
        self._in: list[str] = []
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs))
        self._in.append(tag)
        if tag == "figure":
            self.tiles.append(PageTile(attrs))
        elif tag == "img" and self.tiles and "figure" in self._in:
            self.tiles[-1].images.append(attrs)
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
        elif tag == "meta":
            self.meta.append(attrs)
        elif tag == "div" and attrs.get("class") == "name":
            self.tiles[-1].name = attrs["title"]
        if tag in ("img", "meta"):
            self._in.pop()  # void elements

    def handle_endtag(self, tag):
        while self._in and self._in.pop() != tag:
            pass
        if tag == "tr" and self._row is not None and self.tiles:
            self.tiles[-1].cells.append(self._row)
            self._row = None

    def handle_data(self, data):
        self.text.append(data)
        if self._in and self._in[-1] == "script":
            self.scripts.append(data)
        elif self._row is not None and self._in and self._in[-1] in ("td", "th", "span"):
            self._row[-1] += data
        elif "figure" in self._in:
            self.tiles[-1].texts.append(data)


def read_page(path: Path) -> Page:
    page = Page()
    page.feed(Path(path).read_text(encoding="utf-8"))
    page.close()
    return page


def picture(src: str) -> Image.Image:
    """The image of a data: URI."""
    head, data = src.split(",", 1)
    assert head == "data:image/jpeg;base64", head
    return Image.open(io.BytesIO(base64.b64decode(data)))
