"""The demo page (Gradio): upload or pick an image -> the top-k labels as bars and the most similar items;
with several heads, one group per attribute, titled by its column: a label column's top-k as bars, a tag
column's top-k tags with the predicted ones marked.

Offline by construction: no analytics, no share link, no server-side rendering process; Gradio serves its own
assets. Its file route serves only what Gradio itself wrote into this page's private temp folder (uploads,
the example pictures, gallery thumbnails made from index items); the model's and the index's folders are
blocked outright.
"""

from __future__ import annotations

import base64
import io
import os
from collections.abc import Callable
from pathlib import Path

from PIL import Image

# (image bytes, explain) -> the /predict JSON ("explanation" when asked); raises ValueError with the reason
ANSWER = Callable[[bytes, bool], dict]


def use_private_gradio_dirs(root: Path) -> None:
    """Point Gradio's upload folder and example cache into `root` (a fresh temp folder), before gradio is
    imported, so its file route cannot serve another app's uploads (the shared /tmp/gradio) or the cwd."""
    os.environ["GRADIO_TEMP_DIR"] = str(root / "uploads")
    os.environ["GRADIO_EXAMPLES_CACHE"] = str(root / "examples_cache")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


def build_demo(
    answer: ANSWER,
    thumbnail: Callable[[int], Image.Image | None] | None,
    title: str,
    top_k: int,
    examples: list[str],
    attributes: list[tuple[str, str]] | None = None,
    unknown: bool = False,
):
    """`attributes`: (column, kind) per head of a model with several, in head order; None for one label.
    `unknown`: the answers carry unknown_score and unknown (serve.py unknown=), shown in a box of its own."""
    import gradio as gr

    def classify(path: str | None):
        if not path:
            return (*[None] * ((len(attributes) if attributes else 1) + unknown), [])
        try:
            result = answer(Path(path).read_bytes(), False)
        except ValueError as err:
            raise gr.Error(str(err)) from None
        if attributes:
            shown = [attribute_value(result["attributes"][column], kind) for column, kind in attributes]
        else:
            shown = [{item["label"]: item["prob"] for item in result["labels"]}]
        if unknown:
            shown.append(unknown_verdict(result))
        gallery = []
        for item in result.get("similar", []):
            picture = thumbnail(item["id"]) if thumbnail else None
            if picture is not None:
                gallery.append((picture, f"{item['label'] or item['path']} {item['score']:.2f}"))
        return *shown, gallery

    def explain(path: str | None):
        if not path:
            return None
        try:
            return explanation_picture(answer(Path(path).read_bytes(), True).get("explanation"))
        except ValueError as err:
            raise gr.Error(str(err)) from None

    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(f"## {title}")
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath", label="Product photo", sources=["upload"], height=280, elem_id="query"
                )
                button = gr.Button("Classify", variant="primary", elem_id="classify")
                why = gr.Button("Where did it look? (Grad-CAM)", elem_id="explain")
                if examples:
                    gr.Examples(examples=[[p] for p in examples], inputs=[image], label="Catalogue examples")
            with gr.Column():
                if attributes:
                    shown = [attribute_component(gr, column, kind, top_k) for column, kind in attributes]
                else:
                    shown = [gr.Label(num_top_classes=top_k, label="Top labels", elem_id="labels")]
                if unknown:
                    shown.append(gr.Textbox(label="Unknown product?", interactive=False, elem_id="unknown"))
                gallery = gr.Gallery(
                    label="Most similar catalogue items", columns=5, format="png", elem_id="similar"
                )
                heatmap = gr.Image(
                    type="pil",
                    label="Grad-CAM of the top label",
                    height=280,
                    format="png",
                    interactive=False,
                    elem_id="explanation",
                )
        outputs = [*shown, gallery]
        button.click(classify, inputs=[image], outputs=outputs, api_name="classify")
        image.upload(classify, inputs=[image], outputs=outputs, api_name=False)
        # Its own event, so classify's answers keep their shape: the page asks /predict with explain=true.
        why.click(explain, inputs=[image], outputs=[heatmap], api_name="explain")
    return demo


def unknown_verdict(result: dict) -> str:
    """The unknown box's text for one answer."""
    verdict = "unknown: unlike the training catalogue" if result["unknown"] else "known: like the catalogue"
    return f"{verdict} (unknown_score {result['unknown_score']:.3f})"


def explanation_picture(explanation: dict | None) -> Image.Image | None:
    """The overlay of a /predict answer's "explanation" (a base64 PNG), or None when none was asked for."""
    if not explanation:
        return None
    return Image.open(io.BytesIO(base64.b64decode(explanation["overlay_png"]))).convert("RGB")


def attribute_component(gr, column: str, kind: str, top_k: int):
    """A label column's top-k as bars; a tag column's top-k tags as text, the predicted ones highlighted."""
    elem_id = "attribute-" + "".join(c if c.isalnum() else "-" for c in column)
    if kind == "tags":
        return gr.HighlightedText(
            label=f"{column} (predicted tags highlighted)", color_map={"predicted": "green"}, elem_id=elem_id
        )
    return gr.Label(num_top_classes=top_k, label=column, elem_id=elem_id)


def attribute_value(attribute: dict, kind: str):
    """One column of a /predict answer's "attributes" as its component shows it."""
    if kind != "tags":
        return {item["label"]: item["prob"] for item in attribute["labels"]}
    predicted = {item["tag"] for item in attribute["tags"]}
    return [
        (f"{item['label']} {item['prob']:.2f}", "predicted" if item["label"] in predicted else None)
        for item in attribute["labels"]
    ]


def write_examples(image: Callable[[int], Image.Image | None], ids: list[int], folder: Path) -> list[str]:
    """A few index items as lossless PNGs (their own pixels) in the page's private folder, for gr.Examples."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in ids:
        picture = image(i)
        if picture is not None:
            path = folder / f"item_{i}.png"
            picture.save(path)
            paths.append(str(path))
    return paths


def example_ids(labels, count: int = 6) -> list[int]:
    """The rows of the first item of each of the first `count` labels (or the first items, unlabelled)."""
    if labels is None or not len(labels):
        return list(range(count))
    first: dict[int, int] = {}
    for i, label in enumerate(labels):
        if label is None:  # an item added without a label
            continue
        first.setdefault(int(label), i)
        if len(first) == count:
            break
    return list(first.values())
