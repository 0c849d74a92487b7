"""serve(cfg): the HTTP API (LitServe) with the demo page mounted at /demo; demo(cfg): the demo page alone.

SIGTERM drains: the HTTP processes stop accepting, finish the requests in flight, and exit; then LitServe
stops its inference workers.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from skuvision.errors import SkuvisionError
from skuvision.runtime_guards import LITSERVE_API_PROCESS
from skuvision.serving.catalogue import CatalogueImages, index_folder, load_index
from skuvision.serving.demo import use_private_gradio_dirs
from skuvision.serving.predictor import BadImage, ModelCard, Predictor, model_card
from skuvision.tasks.utils import set_threads

log = logging.getLogger("skuvision")

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
LOOPBACK = {"127.0.0.1": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}
DRAIN_SECONDS = 30


def model_info(card: ModelCard, index, cfg: DictConfig) -> dict:
    """GET /info's "model" part."""
    return {
        "name": card.name,
        "checkpoint": card.checkpoint,
        "sha256": card.sha256,
        "classes": card.class_names,
        "input_size": list(card.input_config["input_size"]),
        "backend": card.backend,
        "onnx": card.onnx_path,
        "tta": card.tta,
        "top_k": int(cfg.top_k),
        "k": int(cfg.k),
        "index": None if index is None else {"items": len(index.items), "kind": index.kind, "dim": index.dim},
    }


def check_host(host: str) -> str:
    if host not in HOSTS:
        raise SkuvisionError(
            f"serve.host={host}: use 127.0.0.1 (this machine only), 0.0.0.0 or :: (all networks)"
        )
    return host


def blocked_paths(card: ModelCard, index_dir: Path | None) -> list[str]:
    """The model's and the index's folders: never served by the demo's file route, whatever else changes."""
    folders = {Path(card.checkpoint).resolve().parent}
    if card.onnx_path:
        folders.add(Path(card.onnx_path).resolve().parent)
    if index_dir:
        folders.add(index_dir.resolve())
    return sorted(str(f) for f in folders)


def prepared(cfg: DictConfig):
    serve_cfg = cfg.serve
    check_host(serve_cfg.host)
    card = model_card(cfg.ckpt_path, serve_cfg.backend, serve_cfg.get("onnx_path"), cfg.get("tta"))
    index_dir = index_folder(cfg.index) if cfg.get("index") else None
    index = load_index(index_dir) if index_dir else None
    if index is not None and list(index.class_names) and list(index.class_names) != card.class_names:
        log.warning("index classes %s differ from the checkpoint's %s", index.class_names, card.class_names)
    return card, index_dir, index


def mount_demo(app, cfg, card, index_dir, index, answer, private: Path):
    import gradio as gr

    from skuvision.serving.demo import build_demo, example_ids, write_examples

    images = CatalogueImages(index, card.checkpoint) if index is not None else None
    examples = write_examples(images.image, example_ids(index.labels), private / "examples") if images else []
    demo = build_demo(
        answer,
        images.thumbnail if images else None,
        f"skuvision · {card.name} ({card.sha256})",
        int(cfg.top_k),
        examples,
    )
    options = dict(
        allowed_paths=[],
        blocked_paths=blocked_paths(card, index_dir),
        max_file_size=f"{int(cfg.serve.max_upload_mb)}mb",
        ssr_mode=False,
    )
    if app is None:
        return demo, options
    gr.mount_gradio_app(app, demo, path="/demo", **options)
    return demo, options


def http_answer(host: str, port: int):
    """The demo inside the server asks the server's own /predict, so it shows exactly what the API answers."""
    import httpx

    url = f"http://{LOOPBACK[host]}:{port}/predict"

    def answer(data: bytes) -> dict:
        response = httpx.post(
            url, content=data, headers={"content-type": "application/octet-stream"}, timeout=120
        )
        if response.status_code != 200:
            raise ValueError(response.json().get("detail", f"HTTP {response.status_code}"))
        return response.json()

    return answer


def drain_on_sigterm() -> None:
    """SIGTERM -> let each HTTP process finish its requests in flight (uvicorn's graceful shutdown), then
    leave LitServer.run through its KeyboardInterrupt path, which stops the inference workers."""

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:  # an HTTP process inherits this handler; uvicorn re-raises there on exit
            return
        log.info("SIGTERM: finishing requests in flight")
        servers = [p for p in multiprocessing.active_children() if p.name.startswith(LITSERVE_API_PROCESS)]
        for process in servers:
            process.terminate()
        for process in servers:
            process.join(DRAIN_SECONDS + 5)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


def interrupt(signum, frame):
    raise KeyboardInterrupt


def build_server(cfg: DictConfig, card: ModelCard, index_dir: Path | None, index, private: Path):
    import litserve as ls

    from skuvision.serving.api import ImageAPI

    s = cfg.serve
    api = ImageAPI(
        card,
        str(index_dir) if index_dir else None,
        int(cfg.top_k),
        int(cfg.k),
        cfg.get("threads"),
        max_batch_size=int(s.max_batch_size),
        batch_timeout=float(s.batch_timeout),
    )
    limit = int(float(s.max_upload_mb) * 1024 * 1024)
    server = ls.LitServer(
        api,
        accelerator=s.accelerator,
        devices=s.devices,
        workers_per_device=int(s.workers_per_device),
        timeout=float(s.timeout),
        model_metadata=model_info(card, index, cfg),
        max_payload_size=limit,
    )
    server.app.state.max_upload_bytes = limit
    if s.demo:
        mount_demo(server.app, cfg, card, index_dir, index, http_answer(s.host, int(s.port)), private)
    return server


def serve(cfg: DictConfig) -> None:
    card, index_dir, index = prepared(cfg)
    s = cfg.serve
    with tempfile.TemporaryDirectory(prefix="skuvision-serve-") as tmp:
        private = Path(tmp)
        if s.demo:
            use_private_gradio_dirs(private)
        server = build_server(cfg, card, index_dir, index, private)
        where = f"http://{LOOPBACK[s.host]}:{s.port}"
        print(f"serving {card.name} ({card.backend}, sha256 {card.sha256}) on {s.host}:{s.port}")
        print(
            f"  POST {where}/predict   GET {where}/health   GET {where}/info"
            + (f"   {where}/demo" if s.demo else "")
        )
        drain_on_sigterm()
        server.run(
            host=s.host,
            port=int(s.port),
            num_api_servers=s.get("api_servers"),
            log_level=s.log_level,
            generate_client_file=False,
        )
    print("server stopped")


def demo(cfg: DictConfig) -> None:
    """The page alone: the model runs in this process."""
    set_threads(cfg.get("threads"))
    card, index_dir, index = prepared(cfg)
    predictor = Predictor(card, index, cfg.top_k, cfg.k)

    def answer(data: bytes) -> dict:
        try:
            image = predictor.decode(data)
        except BadImage as err:
            raise ValueError(str(err)) from None
        return predictor.answer(image[None])[0]

    with tempfile.TemporaryDirectory(prefix="skuvision-demo-") as tmp:
        use_private_gradio_dirs(Path(tmp))
        page, options = mount_demo(None, cfg, card, index_dir, index, answer, Path(tmp))
        print(f"demo page on http://{LOOPBACK[cfg.serve.host]}:{cfg.serve.port}")
        signal.signal(signal.SIGTERM, interrupt)  # Gradio closes on KeyboardInterrupt; the temp folder goes
        page.launch(
            server_name=cfg.serve.host,
            server_port=int(cfg.serve.port),
            share=False,
            show_error=True,
            **options,
        )
