"""A model with several heads, shipped: predict.py's CSV, the server's JSON (torch and ONNX) and the demo page
answer every attribute as the model's own readout does (skuvision.readout), calibrated per column where
predict.py is given a calibration; a coarser level always agrees with its finer one; a bad upload gets its 4xx
and the server goes on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from torch import nn

from skuvision.calibration import calibration_for_heads
from skuvision.checkpoints import load_classifier
from skuvision.data.datasets import InputImageFiles
from skuvision.data.transforms import ToModelInput
from skuvision.errors import SkuvisionError
from skuvision.outputs import file_sha256
from skuvision.readout import head_probs, read_heads
from skuvision.serving.predictor import Predictor, model_card
from tests.helpers import predict_csv
from tests.pages import read_page
from tests.serving_fixtures import RunningServer
from tests.writers import CATALOGUE_TYPES

torch.set_num_threads(2)

LABELS = ["articleType", "masterCategory", "baseColour"]
QUERIES = 12


@pytest.fixture(scope="module")
def catalogue(catalogue_export) -> Path:
    return catalogue_export.parent


@pytest.fixture(scope="module")
def checkpoint(catalogue_run) -> Path:
    """articleType, its coarser masterCategory (read off it), baseColour and a tag column; flip TTA, so every
    reader must average the views per head."""
    return sorted((catalogue_run / "checkpoints").glob("best-*.ckpt"))[0]


@pytest.fixture(scope="module")
def queries(catalogue, tmp_path_factory) -> list[Path]:
    """Twelve catalogue photos (every article type), as files outside the catalogue."""
    folder = tmp_path_factory.mktemp("queries")
    for image in sorted((catalogue / "images").glob("*.jpg"))[:QUERIES]:
        shutil.copy(image, folder / image.name)
    return sorted(folder.glob("*.jpg"))


def readout(checkpoint: Path, paths: list[Path], calibration: tuple = ({}, None, None)):
    """The model's own answer per image (top 5), decoded as predict.py and the server decode a file."""
    module = load_classifier(checkpoint).eval()
    files = InputImageFiles(paths, module.input_config)
    images = torch.stack([files.decode(i) for i in range(len(paths))])
    with torch.inference_mode():
        logits = module.predict_logits(ToModelInput(module.input_config)(images), module.tta)
    temperatures, thresholds, tag_thresholds = calibration
    probs = head_probs(module.heads, logits, temperatures)
    return module.heads, read_heads(module.heads, probs, 5, thresholds, tag_thresholds)


def assert_row_is_the_readout(row: dict, answers, calibrated: bool = False) -> None:
    for answer in answers:
        column = answer.column
        if answer.kind == "tags":
            assert row[column] == ";".join(tag for tag, _ in answer.tags), column
            probs = [float(p) for p in row[f"{column}_probs"].split(";") if p]
            assert probs == pytest.approx([p for _, p in answer.tags], abs=1e-5), column
            continue
        label, prob = answer.ranked[0]
        assert row[column] == label, column
        assert float(row[f"{column}_prob"]) == pytest.approx(prob, abs=1e-5), column
        if calibrated:
            assert row[f"{column}_review"] == str(answer.review).lower(), column


@pytest.fixture(scope="module")
def predicted(checkpoint, queries, tmp_path_factory):
    """predict.py over the queries and one file that is not an image."""
    folder = queries[0].parent
    (folder / "broken.jpg").write_bytes(b"not a jpeg at all")
    try:
        return predict_csv(checkpoint, folder, tmp_path_factory.mktemp("predict"))
    finally:
        (folder / "broken.jpg").unlink()


def test_predictions_csv_has_a_column_per_attribute_and_agrees_with_the_readout(
    predicted, checkpoint, queries
):
    header, rows = predicted
    assert header == [
        "path", "error",
        "articleType", "articleType_prob",
        "masterCategory", "masterCategory_prob",
        "baseColour", "baseColour_prob",
        "tags", "tags_probs",
    ]  # fmt: skip
    by_path = {row["path"]: row for row in rows}
    broken = by_path.pop(str(queries[0].parent / "broken.jpg"))
    assert broken["error"] and not any(broken[c] for c in header[2:])
    _, answers = readout(checkpoint, queries)
    assert len(by_path) == QUERIES
    for path, image in zip(queries, answers, strict=True):
        row = by_path[str(path)]
        assert row["error"] == ""
        assert_row_is_the_readout(row, image)
        assert row["masterCategory"] == CATALOGUE_TYPES[row["articleType"]]  # the taxonomy holds
    assert len({row["articleType"] for row in by_path.values()}) > 1, "the test model predicts one type only"
    assert any(row["tags"] for row in by_path.values()), (
        "no tag is ever predicted: the tag test means nothing"
    )


def threshold_fields(threshold: float | None, accepted: int = 40) -> dict:
    return {
        "threshold": threshold,
        "target": 0.9,
        "threshold_chosen": threshold,
        "threshold_needs": 29,
        "threshold_warning": None if threshold is not None else "no confidence threshold reaches 90.0%",
        "val_images": 48,
        "val_wrong": 2,
        "val_accepted": accepted,
        "val_accuracy_lower_bound": 0.93,
        "val_accuracy_at_threshold": 1.0,
        "val_coverage": accepted / 48,
    }


def write_calibration(folder: Path, checkpoint: Path, thresholds: dict, tag_thresholds: dict) -> Path:
    """calibration.json as eval.py writes it for a model with several heads (the brief's contract), by hand:
    a temperature of 2.5 for articleType and 0.5 for baseColour, masterCategory read off articleType's."""
    module = load_classifier(checkpoint)
    temperature = {"articleType": 2.5, "baseColour": 0.5}
    heads = {}
    classes = {h.column: h.classes for h in module.heads}
    for column in ("articleType", "baseColour"):
        heads[column] = {
            "classes": classes[column],
            "temperature": temperature[column],
            "temperature_fitted": temperature[column],
            "temperature_warning": None,
            **threshold_fields(thresholds[column]),
        }
    heads["masterCategory"] = {
        "classes": classes["masterCategory"],
        "temperature_of": "articleType",
        **threshold_fields(thresholds["masterCategory"]),
    }
    heads["tags"] = {
        "classes": classes["tags"],
        "thresholds": tag_thresholds,
        "objective": "f1",
        "target": None,
        "fallback": [],
        "global_threshold": 0.5,
        "min_support": 5,
    }
    saved = {
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": file_sha256(checkpoint),
        "tta": module.tta,
        "class_names": module.class_names,
        "temperature": 2.5,
        "temperature_fitted": 2.5,
        "temperature_warning": None,
        **threshold_fields(thresholds["articleType"]),
        "heads": heads,
    }
    folder.mkdir(parents=True)
    (folder / "calibration.json").write_text(json.dumps(saved, indent=1))
    return folder


def test_calibrated_predictions_apply_each_columns_temperature_and_thresholds(
    predicted, checkpoint, queries, tmp_path, capsys
):
    """Per column: its temperature (masterCategory summed from articleType's calibrated probabilities), its
    review threshold (baseColour has none: every row to review; an unreadable row always), and per-tag
    thresholds for the tags."""
    plain = {row["path"]: row for row in predicted[1]}
    # Thresholds that split the queries in halves, on the calibrated probabilities (T = 2.5 flattens them),
    # midway between two images so that no image sits on one.
    _, flattened = readout(checkpoint, queries, ({"articleType": 2.5}, None, None))
    article = sorted(image[0].ranked[0][1] for image in flattened)
    master = sorted(image[1].ranked[0][1] for image in flattened)
    half = len(queries) // 2
    thresholds = {
        "articleType": (article[half - 1] + article[half]) / 2,
        "masterCategory": (master[half - 1] + master[half]) / 2,
        "baseColour": None,
    }
    tag_thresholds = {"floral": 0.2, "sticker": 0.9}
    folder = write_calibration(tmp_path / "eval", checkpoint, thresholds, tag_thresholds)
    calibration = calibration_for_heads(json.loads((folder / "calibration.json").read_text()))
    assert calibration[0]["articleType"] == 2.5 and calibration[2]["tags"] == tag_thresholds

    inputs = queries[0].parent
    (inputs / "broken.jpg").write_bytes(b"not a jpeg at all")
    try:
        header, rows = predict_csv(checkpoint, inputs, tmp_path, f"calibration={folder}")
    finally:
        (inputs / "broken.jpg").unlink()
    assert header == [
        "path", "error",
        "articleType", "articleType_prob", "articleType_review",
        "masterCategory", "masterCategory_prob", "masterCategory_review",
        "baseColour", "baseColour_prob", "baseColour_review",
        "tags", "tags_probs",
    ]  # fmt: skip
    printed = capsys.readouterr().out
    by_path = {row["path"]: row for row in rows}
    broken = by_path.pop(str(inputs / "broken.jpg"))
    assert [broken[f"{c}_review"] for c in LABELS] == ["true"] * 3
    _, answers = readout(checkpoint, queries, calibration)
    for path, image in zip(queries, answers, strict=True):
        assert_row_is_the_readout(by_path[str(path)], image, calibrated=True)
        assert by_path[str(path)]["masterCategory"] == CATALOGUE_TYPES[by_path[str(path)]["articleType"]]
    reviews = {c: [row[f"{c}_review"] for row in by_path.values()] for c in LABELS}
    assert set(reviews["articleType"]) == {"true", "false"} and set(reviews["masterCategory"]) == {
        "true",
        "false",
    }
    assert set(reviews["baseColour"]) == {"true"}
    # The calibration changed what is written: flatter articleType probabilities, other tags.
    changed = [float(by_path[p]["articleType_prob"]) < float(plain[p]["articleType_prob"]) for p in by_path]
    assert all(changed)
    assert any(by_path[p]["tags"] != plain[p]["tags"] for p in by_path), "the tag thresholds changed nothing"
    marked = reviews["articleType"].count("true") + 1  # and the unreadable row
    assert f"review articleType: {marked} of {QUERIES + 1} rows marked" in printed
    assert f"review baseColour: all {QUERIES + 1} rows marked" in printed
    assert_gallery_shows_the_csv(tmp_path / "run" / "predictions.html", by_path, broken["path"])


def assert_gallery_shows_the_csv(page_path: Path, by_path: dict, broken: str) -> None:
    """predictions.html: every column of every row as the CSV has it, review flags, the unreadable file and
    then the lowest of an image's label probabilities first."""
    page = read_page(page_path)
    assert page.tiles[0].name == broken and page.tiles[0].review and not page.tiles[0].images
    shown = page.tiles[1:]
    assert {t.name for t in shown} == set(by_path)
    lowest = {p: min(float(row[f"{c}_prob"]) for c in LABELS) for p, row in by_path.items()}
    assert [t.name for t in shown] == sorted(by_path, key=lowest.get)
    for tile in shown:
        row, said, column = by_path[tile.name], {}, ""
        for head, label, prob in tile.cells:
            column = head.split()[0] if head else column
            said.setdefault(column, []).append((label, prob))
            if head:
                assert ("review" in head.split()) == (row.get(f"{column}_review") == "true"), column
        for c in LABELS:
            assert said[c] == [(row[c], f"{float(row[f'{c}_prob']):.1%}")], c
        pairs = zip(row["tags"].split(";"), row["tags_probs"].split(";"), strict=True) if row["tags"] else []
        assert said["tags"] == ([(t, f"{float(p):.1%}") for t, p in pairs] or [("(none)", "")])
        assert tile.confidence == pytest.approx(lowest[tile.name], abs=1e-6) and len(tile.images) == 1


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """serve.py on the model with several heads: torch, with the demo page."""
    cwd = tmp_path_factory.mktemp("heads_serve")
    running = RunningServer(
        [f"ckpt_path={checkpoint}", "serve.max_batch_size=4", "serve.batch_timeout=0.05"], cwd, "heads"
    )
    try:
        running.wait_healthy()
        yield running
    finally:
        running.stop()


def assert_answer_is_the_readout(answer: dict, image) -> None:
    """Every attribute of a /predict answer: its top-k labels (and a tag column's predicted tags) as the
    readout's, probabilities to 1e-5; "labels" is the first label column's."""
    assert set(answer["attributes"]) == {a.column for a in image}
    for expected in image:
        got = answer["attributes"][expected.column]
        assert [item["label"] for item in got["labels"]] == [label for label, _ in expected.ranked]
        assert [item["prob"] for item in got["labels"]] == pytest.approx(
            [p for _, p in expected.ranked], abs=1e-5
        )
        if expected.kind == "tags":
            assert [item["tag"] for item in got["tags"]] == [tag for tag, _ in expected.tags]
            assert [item["prob"] for item in got["tags"]] == pytest.approx(
                [p for _, p in expected.tags], abs=1e-5
            )
        else:
            assert "tags" not in got
    assert answer["labels"] == answer["attributes"]["articleType"]["labels"]


@pytest.mark.slow
def test_the_server_and_its_page_answer_every_attribute_as_predict_py_does(
    server, predicted, checkpoint, queries
):
    """One response per image holds every attribute, equal to the readout and to predict.py's row; /info
    names the attributes; an upload that is not an image gets its 400 and the next one is answered; the demo
    page shows each attribute under its column's name."""
    info = httpx.get(server.url + "/info").json()["model"]
    assert {c: a["kind"] for c, a in info["attributes"].items()} == {
        "articleType": "label", "masterCategory": "label", "baseColour": "label", "tags": "tags"
    }  # fmt: skip
    assert info["attributes"]["masterCategory"]["read_off"] == "articleType"
    rows = {row["path"]: row for row in predicted[1]}
    _, answers = readout(checkpoint, queries)
    for i, (path, image) in enumerate(zip(queries, answers, strict=True)):
        if i == 3:
            bad = httpx.post(server.url + "/predict", files={"file": ("x.jpg", b"GIF89a broken")}, timeout=60)
            assert bad.status_code == 400 and "image" in bad.json()["detail"]
        response = httpx.post(
            server.url + "/predict", files={"file": (path.name, path.read_bytes())}, timeout=60
        )
        assert response.status_code == 200, response.text
        answer = response.json()
        assert_answer_is_the_readout(answer, image)
        row = rows[str(path)]
        for column in LABELS:
            top = answer["attributes"][column]["labels"][0]
            assert top["label"] == row[column]
            assert top["prob"] == pytest.approx(float(row[f"{column}_prob"]), abs=1e-5)
        assert ";".join(t["tag"] for t in answer["attributes"]["tags"]["tags"]) == row["tags"]

    from gradio_client import Client, handle_file

    page = Client(server.url + "/demo/", verbose=False, download_files=str(server.tmp / "downloads"))
    api = page.view_api(return_format="dict", print_info=False)["named_endpoints"]["/classify"]
    assert [r["label"] for r in api["returns"]] == [
        "articleType", "masterCategory", "baseColour", "tags (predicted tags highlighted)",
        "Most similar catalogue items",
    ]  # fmt: skip
    article, master, colour, tags, gallery = page.predict(handle_file(str(queries[0])), api_name="/classify")
    first = answers[0]
    assert (article["label"], master["label"], colour["label"]) == tuple(a.ranked[0][0] for a in first[:3])
    predicted_tags = [
        entry["token"].split()[0] for entry in tags if entry["class_or_confidence"] == "predicted"
    ]
    assert predicted_tags == [tag for tag, _ in first[3].tags] and gallery == []


class PerHeadGraph(nn.Module):
    """The export contract: uint8 images -> one output per trained head, named by its column."""

    def __init__(self, module):
        super().__init__()
        self.to_model_input = ToModelInput(module.input_config)
        self.module = module
        self.columns = [h.column for h in module.heads if not h.derived]

    def forward(self, images):
        out = self.module.forward_trained(self.to_model_input(images))
        return tuple(out[c] for c in self.columns)


def test_onnx_outputs_named_by_column_give_the_torch_answers(checkpoint, queries, tmp_path):
    """An ONNX graph with the trained heads' outputs only: the derived column is summed from its source's,
    each head averaged over the TTA views, and every answer is the torch backend's. A graph without an
    output for a head is refused in one line."""
    import onnx

    module = load_classifier(checkpoint).eval()
    files = InputImageFiles(queries, module.input_config)
    images = torch.stack([files.decode(i) for i in range(len(queries))])
    graph = PerHeadGraph(module).eval()
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        graph,
        (images[:2],),
        str(path),
        input_names=["images"],
        output_names=graph.columns,
        dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        dynamo=True,
        external_data=False,
    )
    meta = {"class_names": module.class_names, "input": module.input_config, "input_dtype": "uint8"}
    path.with_suffix(".json").write_text(json.dumps(meta))
    assert [o.name for o in onnx.load(str(path)).graph.output] == ["articleType", "baseColour", "tags"]

    on_onnx = Predictor(model_card(str(checkpoint), "onnx", str(path))).answer(images)
    on_torch = Predictor(model_card(str(checkpoint))).answer(images)
    _, answers = readout(checkpoint, queries)
    for onnx_answer, torch_answer, image in zip(on_onnx, on_torch, answers, strict=True):
        assert onnx_answer["backend"] == "onnx"
        assert_answer_is_the_readout(torch_answer, image)
        assert_answer_is_the_readout(onnx_answer, image)

    renamed = onnx.load(str(path))
    for node in renamed.graph.node:
        node.output[:] = ["colour" if name == "baseColour" else name for name in node.output]
    renamed.graph.output[1].name = "colour"
    onnx.save(renamed, str(path))
    with pytest.raises(
        SkuvisionError, match=r"no output per head for \['baseColour'\].*export this checkpoint"
    ):
        model_card(str(checkpoint), "onnx", str(path))
