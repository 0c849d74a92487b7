"""The prediction gallery (skuvision.gallery): predictions.html and predictions.png beside predict.py's CSV;
escaping, the cap, the order, extra pictures, and the page in a real browser, offline."""

from __future__ import annotations

import base64
import csv
import hashlib
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from PIL import Image

from skuvision.errors import SkuvisionError
from skuvision.gallery import (
    SCRIPT,
    Answer,
    GalleryOptions,
    Tile,
    doubtful_first,
    gallery_options,
    tiles_from_predictions,
    write_gallery,
    write_gallery_and_sheet,
)
from skuvision.models.heads import Head
from skuvision.tasks.predict import predict
from tests.browser import MISSING, have_chromium, requested_urls
from tests.helpers import compose_cfg
from tests.pages import picture, read_page

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}


def solid(path: Path, colour: str, size=(60, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)
    return path


def tile(path: Path, label: str, p: float, review: bool | None = None, **kw) -> Tile:
    return Tile(str(path), path, [Answer("", "label", [(label, p), ("other", 1 - p)], review)], **kw)


def near(rgb, colour: str, tolerance: int = 40) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(rgb, COLOURS[colour], strict=True))


def test_names_and_labels_are_escaped_and_only_the_pages_own_script_can_run(tmp_path):
    hostile = "<script>alert(1)</script>"
    image = solid(tmp_path / f'{hostile}" onload="alert(2).png', "red")
    label = "<img src=x onerror=alert(3)>"
    column = "</table><script>alert(4)</script>"
    tiles = [Tile(str(image), image, [Answer(column, "label", [(label, 0.4)], True)])]
    write_gallery(tmp_path / "page.html", f"{hostile} title", tiles, GalleryOptions(), summary=hostile)
    page = read_page(tmp_path / "page.html")
    assert page.scripts == [SCRIPT]
    assert not [(tag, a) for tag, a in page.elements for a in a if a.startswith("on")]
    sources = [a["src"] for tag, a in page.elements if "src" in a]
    assert sources and all(s.startswith("data:image/jpeg;base64,") for s in sources)
    # The texts read back as they were given: shown, not run.
    (shown,) = page.tiles
    assert shown.name == str(image)
    assert shown.cells[0] == [f"{column} review", label, "40.0%"]
    assert f"{hostile} title" in page.text
    # The policy allows no other host, file or script: the one script is named by its hash.
    (policy,) = [m["content"] for m in page.meta if m.get("http-equiv") == "Content-Security-Policy"]
    digest = base64.b64encode(hashlib.sha256(SCRIPT.encode()).digest()).decode()
    assert "default-src 'none'" in policy and "img-src data:" in policy
    assert f"script-src 'sha256-{digest}'" in policy


def test_the_page_holds_at_most_max_images_doubtful_first_and_says_how_many_were_left_out(tmp_path):
    confidences = [0.9, 0.3, 0.75, 0.6, 0.99, 0.5, 0.8, 0.45, 0.95, 0.7]
    reviewed = {2, 6}  # flagged although fairly confident: they come before every unflagged one
    tiles = [
        tile(solid(tmp_path / f"img{i}.jpg", "green", (300, 200)), f"class{i % 3}", p, i in reviewed)
        for i, p in enumerate(confidences)
    ]
    tiles.append(
        Tile(
            str(tmp_path / "gone.jpg"), tmp_path / "gone.jpg", tile(tmp_path, "x", 0.9).answers, "unreadable"
        )
    )
    options = GalleryOptions(max_images=5, thumb_px=32)
    write_gallery(tmp_path / "page.html", "t", doubtful_first(tiles), options)
    page = read_page(tmp_path / "page.html")
    names = [Path(t.name).name for t in page.tiles]
    assert names == ["gone.jpg", "img2.jpg", "img6.jpg", "img1.jpg", "img7.jpg"]
    assert "11 image(s)" in "".join(page.text) and "6 left out" in "".join(page.text)
    assert [t.review for t in page.tiles] == [True, True, True, False, False]
    assert "unreadable" in " ".join(page.tiles[0].texts) and not page.tiles[0].images
    for shown in page.tiles[1:]:
        (img,) = shown.images
        thumb = picture(img["src"])
        assert max(thumb.size) == 32 and thumb.size == (int(img["width"]), int(img["height"]))
        assert near(thumb.getpixel((10, 10)), "green")
    # A tile of a 1600 px photo at the default size costs under 4 KB: the default 1,000 stay under 4 MB.
    big = tile(solid(tmp_path / "big.jpg", "blue", (1600, 1200)), "a", 0.5)
    write_gallery(tmp_path / "big.html", "t", [big] * 100, GalleryOptions())
    assert (tmp_path / "big.html").stat().st_size < 100 * 4000


def test_the_contact_sheet_shows_the_pages_first_images_in_its_order(tmp_path):
    tiles = [
        tile(solid(tmp_path / f"{c}.png", c), c, p) for c, p in (("red", 0.9), ("green", 0.2), ("blue", 0.5))
    ]
    ordered = doubtful_first(tiles)
    options = GalleryOptions(sheet_images=2)
    write_gallery_and_sheet(tmp_path / "p.html", tmp_path / "p.png", "sheet", ordered, options)
    with Image.open(tmp_path / "p.png") as sheet:
        assert sheet.size == (2 * 140, 30 + 96 + 44)  # 2 cells of 140 px, a 96 px thumbnail and its caption
        left, right = sheet.convert("RGB").getpixel((70, 78)), sheet.convert("RGB").getpixel((210, 78))
    assert near(left, "green") and near(right, "blue")  # lowest confidence first; red is left out
    assert [Path(t.name).stem for t in read_page(tmp_path / "p.html").tiles] == ["green", "blue", "red"]


def test_the_gallery_reads_both_layouts_of_predictions_csv(tmp_path):
    one = tiles_from_predictions(
        ["path", "error", "review", "label_1", "prob_1", "label_2", "prob_2"],
        [
            ["a.jpg", "", "true", "shirt", "0.600000", "kettle", "0.300000"],
            ["b.jpg", "bad file", "true", "", "", "", ""],
        ],
        [Head("", "label", ["kettle", "shirt"])],
        ";",
        tmp_path,
    )
    assert one[0].answers == [Answer("", "label", [("shirt", 0.6), ("kettle", 0.3)], True)]
    assert one[1].error == "bad file" and one[1].review and one[1].confidence == -1
    heads = [
        Head("type", "label", ["a", "b"]),
        Head("colour", "label", ["red"]),
        Head("tags", "tags", ["x", "y"]),
    ]
    header = ["path", "error", "type", "type_prob", "type_review", "colour", "colour_prob", "colour_review"]
    header += ["tags", "tags_probs"]
    row = ["c.jpg", "", "b", "0.900000", "false", "red", "0.550000", "true", "y|x", "0.800000|0.600000"]
    (many,) = tiles_from_predictions(header, [row], heads, "|", tmp_path)
    assert [(a.column, a.kind, a.ranked, a.review) for a in many.answers] == [
        ("type", "label", [("b", 0.9)], False),
        ("colour", "label", [("red", 0.55)], True),
        ("tags", "tags", [("y", 0.8), ("x", 0.6)], None),
    ]
    assert many.review and many.confidence == 0.55 and many.label == "b"


def test_an_explanation_overlay_is_shown_beside_its_image_and_only_from_inside_the_run_folder(tmp_path):
    run = tmp_path / "run"
    image = solid(tmp_path / "photo.jpg", "green")
    solid(run / "explanations" / "photo.png", "red", (224, 224))
    solid(tmp_path / "secret.png", "blue")
    (run / "explanations" / "link.png").symlink_to(tmp_path / "secret.png")
    header = ["path", "error", "label_1", "prob_1", "explanation"]
    given = ["explanations/photo.png", "../secret.png", str(tmp_path / "secret.png"), "explanations/link.png"]
    rows = [[str(image), "", "shirt", "0.700000", e] for e in given]
    tiles = tiles_from_predictions(header, rows, [Head("", "label", ["shirt"])], ";", run)
    write_gallery(run / "page.html", "t", tiles, GalleryOptions(thumb_px=48))
    page = read_page(run / "page.html")
    first, *refused = page.tiles
    thumb, overlay = first.images
    assert near(picture(thumb["src"]).getpixel((5, 5)), "green")
    assert overlay["data-kind"] == "explanation" and picture(overlay["src"]).size == (48, 48)
    assert near(picture(overlay["src"]).getpixel((5, 5)), "red")
    for shown in refused:  # the image, and a note instead of the file outside
        assert len(shown.images) == 1 and "outside the run folder" in " ".join(shown.texts)


def test_gallery_options_are_checked_and_gallery_false_turns_it_off(tmp_path):
    def options(*overrides):
        return gallery_options(compose_cfg("predict", ["ckpt_path=x", "input=y", *overrides], tmp_path))

    assert options() == GalleryOptions(max_images=1000, thumb_px=96, sheet_images=48)
    assert options("gallery=false") is None
    assert options("gallery.max_images=7").max_images == 7
    with pytest.raises(SkuvisionError, match=r"gallery.max_image is not a gallery key"):
        options("+gallery.max_image=7")
    with pytest.raises(SkuvisionError, match=r"gallery.thumb_px=4: give a whole number, 16 or more"):
        options("gallery.thumb_px=4")


def test_errors_page_of_a_set_without_files_shows_the_data_sets_images(tmp_path):
    import torch

    from skuvision.tasks.evaluate import write_errors_page

    names = ["red", "green", "blue"]
    dataset = [
        (torch.tensor(COLOURS[c], dtype=torch.uint8).view(3, 1, 1).expand(3, 28, 28), 0) for c in names
    ]
    logits = torch.tensor([[0.0, 3.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 1.0]])  # 0 wrong, 1 right, 2 wrong
    labels = torch.tensor([0, 1, 1])
    write_errors_page(tmp_path / "errors.html", logits, labels, None, dataset, names, GalleryOptions())
    page = read_page(tmp_path / "errors.html")
    assert [t.name for t in page.tiles] == ["test image 0", "test image 2"]  # the surer mistake first
    assert [t.cells[0][1] for t in page.tiles] == ["red", "green"]  # the true labels
    assert near(picture(page.tiles[1].images[0]["src"]).getpixel((3, 3)), "blue")


def test_errors_page_of_several_heads_shows_each_columns_truth_most_confident_mistake_first(tmp_path):
    import torch

    from skuvision.models.heads import MISSING
    from skuvision.tasks.evaluate import write_head_errors_page

    heads = [Head("type", "label", ["bag", "shoe"]), Head("colour", "label", ["red", "blue"])]
    heads.append(Head("tags", "tags", ["sale"]))
    probs = {
        "type": torch.tensor([[0.9, 0.1], [0.3, 0.7], [0.6, 0.4], [0.2, 0.8]], dtype=torch.float64),
        "colour": torch.tensor([[0.8, 0.2], [0.45, 0.55], [0.9, 0.1], [0.3, 0.7]], dtype=torch.float64),
        "tags": torch.tensor([[0.9], [0.1], [0.2], [0.7]], dtype=torch.float64),
    }
    targets = {
        "type": torch.tensor([0, 0, 0, 1]),  # image 1 wrong (0.7)
        "colour": torch.tensor([0, MISSING, 1, 1]),  # image 2 wrong (0.9); image 1 has no colour
        "tags": torch.tensor([[1.0], [0.0], [0.0], [1.0]]),
    }
    files = [str(solid(tmp_path / f"{i}.png", "red")) for i in range(4)]
    write_head_errors_page(tmp_path / "errors.html", heads, probs, targets, files, None, GalleryOptions())
    page = read_page(tmp_path / "errors.html")
    assert [t.name for t in page.tiles] == [files[2], files[1]]
    assert page.tiles[0].cells == [
        ["type true", "bag", ""],
        ["type", "bag", "60.0%"],
        ["colour true", "blue", ""],
        ["colour", "red", "90.0%"],
    ]
    assert page.tiles[1].cells == [
        ["type true", "bag", ""],
        ["type", "shoe", "70.0%"],
        ["colour", "blue", "55.0%"],
    ]
    assert "2 of 4 test images" in "".join(page.text)


@pytest.fixture(scope="module")
def gallery_run(serve_checkpoint, shop, tmp_path_factory):
    """predict.py on the shop's photos and one file that is not an image: (run folder, CSV rows)."""
    root = tmp_path_factory.mktemp("gallery_predict")
    listing = root / "list.txt"
    broken = root / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    files = sorted(shop.rglob("*_00[0-5].*")) + [broken]
    listing.write_text("\n".join(map(str, files)) + "\n")
    overrides = [
        f"ckpt_path={serve_checkpoint}",
        f"input={listing}",
        "num_workers=0",
        "trainer.accelerator=cpu",
    ]
    out = predict(compose_cfg("predict", overrides + ["trainer.precision=32"], root / "run"))
    with open(out, newline="") as f:
        return out.parent, list(csv.DictReader(f))


def test_predict_writes_the_gallery_and_sheet_beside_its_csv_and_refuses_to_replace_them(
    gallery_run, serve_checkpoint, shop, tmp_path, capsys
):
    run, rows = gallery_run
    page = read_page(run / "predictions.html")
    by_name = {t.name: t for t in page.tiles}
    assert set(by_name) == {row["path"] for row in rows}
    for row in rows:
        shown = by_name[row["path"]]
        if row["error"]:
            assert not shown.images and row["error"] in " ".join(shown.texts)
        else:
            ranked = [row[f"label_{i}"] for i in range(1, 6) if f"label_{i}" in row]
            assert shown.labels() == ranked and len(ranked) == 4  # top_k=5 of 4 classes
            assert len(shown.images) == 1
    # Doubtful first: the unreadable file, then the lowest top-1 probability.
    assert page.tiles[0].confidence == -1
    confidences = [t.confidence for t in page.tiles[1:]]
    assert confidences == sorted(float(r["prob_1"]) for r in rows if not r["error"])
    with Image.open(run / "predictions.png") as sheet:
        assert sheet.format == "PNG" and sheet.size[0] > 500
    # Into a folder that holds an earlier gallery: refused before any work, nothing replaced.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "predictions.html").write_text("earlier")
    cfg = compose_cfg("predict", [f"ckpt_path={serve_checkpoint}", f"input={shop}"], tmp_path / "run")
    with pytest.raises(SkuvisionError, match="predictions.html exists"):
        predict(cfg)
    assert (tmp_path / "run" / "predictions.html").read_text() == "earlier"
    assert not (tmp_path / "run" / "predictions.csv").exists()


def test_an_output_the_gallery_would_take_is_refused_before_any_work(tmp_path):
    for name in ("p.html", "p.png"):
        overrides = ["ckpt_path=missing.ckpt", "input=x", f"output={tmp_path / name}"]
        cfg = compose_cfg("predict", overrides, tmp_path)
        with pytest.raises(SkuvisionError, match=rf"output=.*{name}: name a .csv file"):
            predict(cfg)


def test_predict_with_gallery_false_writes_only_the_csv(serve_checkpoint, shop, tmp_path):
    overrides = [f"ckpt_path={serve_checkpoint}", f"input={shop / 'phone'}", "num_workers=0", "gallery=false"]
    out = predict(compose_cfg("predict", overrides + ["trainer.accelerator=cpu"], tmp_path / "run"))
    assert sorted(p.name for p in out.parent.iterdir() if p.suffix in (".csv", ".html", ".png")) == [
        "predictions.csv"
    ]


@pytest.mark.slow
@pytest.mark.skipif(not have_chromium(), reason=MISSING)
def test_the_gallery_opens_offline_in_chromium_shows_every_image_doubtful_first_and_sorts(
    browser, gallery_run
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    run, rows = gallery_run
    driver = browser
    requested_urls(driver)  # what earlier pages asked for
    url = (run / "predictions.html").as_uri()
    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script("return document.readyState") == "complete")
    # Every picture decoded (a data: URI that failed or was blocked has no natural width).
    widths = driver.execute_script(
        "return Array.from(document.images).map(i => i.complete && i.naturalWidth)"
    )
    assert len(widths) == sum(not r["error"] for r in rows) and all(w and w > 0 for w in widths)
    # Nothing was asked of any host or other file: the page itself, then data: URIs at most (chrome:// is
    # the browser's own start page, built in).
    urls = requested_urls(driver)
    assert [u for u in urls if urlsplit(u).scheme == "file"] == [url]
    assert not [u for u in urls if urlsplit(u).scheme not in ("file", "data", "chrome")], urls

    def shown():
        figures = driver.find_elements(By.CSS_SELECTOR, "#tiles figure")
        return [
            (f.find_element(By.CSS_SELECTOR, ".name").get_attribute("title"), f.get_attribute("data-label"))
            for f in figures
            if f.is_displayed()
        ]

    top1 = {r["path"]: r["label_1"] for r in rows}
    confidence = {r["path"]: float(r["prob_1"]) if r["prob_1"] else -1.0 for r in rows}
    assert {name: label for name, label in shown()} == top1  # every image, with its label
    names = [name for name, _ in shown()]
    assert [confidence[n] for n in names] == sorted(confidence.values())  # doubtful first
    for figure in driver.find_elements(By.CSS_SELECTOR, "#tiles figure"):
        path = figure.find_element(By.CSS_SELECTOR, ".name").get_attribute("title")
        if top1[path]:
            assert figure.find_element(By.CSS_SELECTOR, "td.label").text == top1[path]
    sort, only = Select(driver.find_element(By.ID, "sort")), Select(driver.find_element(By.ID, "filter"))
    sort.select_by_value("confidence-down")
    assert [confidence[n] for n, _ in shown()] == sorted(confidence.values(), reverse=True)
    sort.select_by_value("label")
    labels = [label for _, label in shown()]
    assert labels == sorted(labels) and len(set(labels)) > 1
    wanted = labels[-1]
    only.select_by_value(wanted)
    assert {n for n, _ in shown()} == {p for p, label in top1.items() if label == wanted}
    assert driver.find_element(By.ID, "shown").text == str(len(shown()))
    if os.environ.get("SKUVISION_GALLERY_SCREENSHOT"):  # a picture for the docs, on request
        driver.save_screenshot(os.environ["SKUVISION_GALLERY_SCREENSHOT"])
