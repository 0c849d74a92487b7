"""serve(cfg): the HTTP API (LitServe) with the demo page mounted at /demo; demo(cfg): the demo page alone.

SIGTERM drains: the HTTP processes stop accepting, end the demo pages' heartbeat streams, finish the requests
in flight, and exit; then LitServe stops its inference workers. Every process the server starts ends on its
own when serve.py's process dies without draining (SIGKILL, the OOM killer).

With LIT_SERVER_API_KEY set, LitServe refuses /predict, /health and /info without that key in X-API-Key, and
the demo page asks for the same key (as the password, any user name) before it shows or answers anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from skuvision.compat import LITSERVE_API_PROCESS, check_file_payloads, end_page_streams
from skuvision.config import set_threads
from skuvision.errors import SkuvisionError
from skuvision.prototypes import load as load_prototypes
from skuvision.serving.api import end_with_parent
from skuvision.serving.catalogue import CatalogueImages, index_folder, load_index
from skuvision.serving.demo import use_private_gradio_dirs
from skuvision.serving.predictor import BadImage, ModelCard, Predictor, model_card
from skuvision.tasks.prototypes import prototypes_file
from skuvision.tasks.utils import resolve_checkpoint
from skuvision.unknown import load_detector

log = logging.getLogger("skuvision")

HOSTS = ("127.0.0.1", "0.0.0.0", "::")  # what LitServe binds
LOOPBACK = {"127.0.0.1": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "[::1]"}
ACCELERATORS = ("auto", "cpu", "cuda")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")  # uvicorn's
DRAIN_SECONDS = 30
DEMO_PATH = "/demo"
API_KEY_VARIABLE = "LIT_SERVER_API_KEY"  # LitServe's; it reads it when imported
API_KEY_HEADER = "X-API-Key"


def model_info(card: ModelCard, index, cfg: DictConfig, unknown=None) -> dict:
    """GET /info's "model" part: files by name and hash, never by where they lie on the server."""
    info = {
        "name": card.name,
        "checkpoint": Path(card.checkpoint).name,
        "sha256": card.sha256,
        "classes": card.class_names,
        "input_size": list(card.input_config["input_size"]),
        "backend": card.backend,
        "onnx": Path(card.onnx_path).name if card.onnx_path else None,
        "tta": card.tta,
        "top_k": int(cfg.top_k),
        "k": int(cfg.k),
        "index": None if index is None else {"items": len(index.items), "kind": index.kind, "dim": index.dim},
        "unknown": None
        if unknown is None
        else {"method": unknown.method, "threshold": unknown.threshold, "keep": unknown.keep},
    }
    if card.prototypes:  # new classes, ranked beside `classes` (their answers' source: "prototype")
        new = load_prototypes(Path(card.prototypes), card.checkpoint, card.class_names)
        info["prototypes"] = {
            "file": Path(card.prototypes).name,
            "classes": new.class_names,
            "images": dict(zip(new.class_names, new.counts, strict=True)),
        }
    if card.heads is not None:  # what each column of an answer's "attributes" can hold
        info["attributes"] = {
            h.column: {"kind": h.kind, "classes": h.classes, "read_off": h.source} for h in card.model_heads()
        }
    return info


def check_host(host: str) -> str:
    if host not in HOSTS:
        raise SkuvisionError(
            f"serve.host={host}: use 127.0.0.1 (this machine only), 0.0.0.0 or :: (all networks)"
        )
    return host


def whole_number(cfg: DictConfig, key: str, low: int, high: int | None = None, optional: bool = False):
    """cfg[key] as an int in [low, high] (None allowed when optional), else a one-line error naming it."""
    value = cfg.get(key.split(".")[-1])
    if optional and value is None:
        return None
    within = isinstance(value, int) and not isinstance(value, bool) and low <= value <= (high or value)
    if not within:
        bound = f"from {low} to {high}" if high else f"{low} or more"
        raise SkuvisionError(f"{key}={value}: use a whole number {bound}" + (" or null" if optional else ""))
    return value


def positive_number(cfg: DictConfig, key: str, zero: bool = False) -> float:
    value = cfg.get(key.split(".")[-1])
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or value < 0 or (value == 0 and not zero):
        raise SkuvisionError(f"{key}={value}: use a number {'0 or more' if zero else 'above 0'}")
    return float(value)


def check_config(cfg: DictConfig) -> None:
    """Every serve/demo key a user sets, checked before anything loads or binds, each in one line."""
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise SkuvisionError(
            "ckpt_path is missing: give the checkpoint to serve, e.g. ckpt_path=outputs/<date>/<time> (a "
            "train.py run folder, or a .ckpt in its checkpoints/)"
        )
    s = cfg.serve
    check_host(s.host)
    whole_number(s, "serve.port", 1024, 65535)
    whole_number(cfg, "top_k", 1)
    whole_number(cfg, "k", 1)
    whole_number(cfg, "threads", 1, optional=True)
    whole_number(s, "serve.workers_per_device", 1)
    whole_number(s, "serve.api_servers", 1, optional=True)
    whole_number(s, "serve.max_batch_size", 1)
    positive_number(s, "serve.batch_timeout", zero=True)
    positive_number(s, "serve.timeout")
    positive_number(s, "serve.max_upload_mb")
    if s.log_level not in LOG_LEVELS:
        raise SkuvisionError(f"serve.log_level={s.log_level}: use one of {', '.join(LOG_LEVELS)}")
    if s.accelerator not in ACCELERATORS:
        raise SkuvisionError(f"serve.accelerator={s.accelerator}: use one of {', '.join(ACCELERATORS)}")
    if s.accelerator == "cuda" and not torch.cuda.is_available():
        raise SkuvisionError("serve.accelerator=cuda but no GPU is visible: use serve.accelerator=cpu")
    if isinstance(s.devices, int):  # or auto, or a list of GPU ids; the CPU counts as one device
        on_gpu = s.accelerator != "cpu" and torch.cuda.is_available()
        whole_number(s, "serve.devices", 1, torch.cuda.device_count() if on_gpu else None)


def check_port_free(host: str, port: int) -> None:
    """A port another program holds is refused here, in one line, before any model is loaded."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds it
        try:
            probe.bind((host, port))
        except OSError as err:
            raise SkuvisionError(
                f"serve.port={port}: {host}:{port} is taken ({err.strerror}); stop what listens there or "
                "choose another serve.port"
            ) from None


def blocked_paths(card: ModelCard, index_dir: Path | None) -> list[str]:
    """The model's and the index's folders: never served by the demo's file route, whatever else changes."""
    folders = {Path(card.checkpoint).resolve().parent}
    if card.onnx_path:
        folders.add(Path(card.onnx_path).resolve().parent)
    if index_dir:
        folders.add(index_dir.resolve())
    return sorted(str(f) for f in folders)


def prepared(cfg: DictConfig):
    check_config(cfg)
    resolve_checkpoint(cfg)
    serve_cfg = cfg.serve
    card = model_card(cfg.ckpt_path, serve_cfg.backend, serve_cfg.get("onnx_path"), cfg.get("tta"))
    new_classes = prototypes_file(cfg, card)
    card.prototypes = str(new_classes.resolve()) if new_classes else None
    index_dir = index_folder(cfg.index) if cfg.get("index") else None
    index = load_index(index_dir) if index_dir else None
    if index is not None and list(index.class_names) and list(index.class_names) != card.class_names:
        log.warning("index classes %s differ from the checkpoint's %s", index.class_names, card.class_names)
    return card, index_dir, index


def unknown_detector(cfg: DictConfig, card: ModelCard):
    """`unknown=`: eval.py's threshold and reference, checked against the served checkpoint before anything
    binds (each inference worker loads it again)."""
    return load_detector(cfg.unknown, card.checkpoint, card.tta) if cfg.get("unknown") else None


def api_key() -> str | None:
    return os.environ.get(API_KEY_VARIABLE) or None


def key_login(key: str):
    """Gradio's login for the demo page: any user name, the API key as the password."""

    def check(username: str, password: str) -> bool:
        return hmac.compare_digest(password.encode(), key.encode())

    return check


def end_page_streams_on_sigterm(app, gradio_app) -> None:
    """In each HTTP process, SIGTERM first ends the demo pages' heartbeat streams, then starts uvicorn's
    graceful shutdown; one open page would otherwise hold that shutdown for its whole timeout."""
    outer = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(served):
        async with outer(served) as state:
            # Startup runs after uvicorn installed its SIGTERM handler; it is chained here, and uvicorn puts
            # back the one before it when it stops.
            uvicorn_handler = signal.getsignal(signal.SIGTERM)
            if threading.current_thread() is threading.main_thread() and callable(uvicorn_handler):
                loop = asyncio.get_running_loop()

                def handler(signum, frame):
                    end_page_streams(gradio_app, loop)
                    uvicorn_handler(signum, frame)

                signal.signal(signal.SIGTERM, handler)
            yield state

    app.router.lifespan_context = lifespan


def mount_demo(app, cfg, card, index_dir, index, answer, private: Path):
    import gradio as gr
    from starlette.routing import Mount

    from skuvision.serving.demo import build_demo, example_ids, write_examples

    images = CatalogueImages(index, card.data, card.input_config) if index is not None else None
    examples = write_examples(images.image, example_ids(index.labels), private / "examples") if images else []
    demo = build_demo(
        answer,
        images.thumbnail if images else None,
        f"skuvision · {card.name} ({card.sha256})",
        int(cfg.top_k),
        examples,
        [(h.column, h.kind) for h in card.model_heads()] if card.heads is not None else None,
        unknown=bool(cfg.get("unknown")),
    )
    options = dict(
        allowed_paths=[],
        blocked_paths=blocked_paths(card, index_dir),
        max_file_size=f"{int(cfg.serve.max_upload_mb)}mb",
        ssr_mode=False,
        show_error=False,  # Gradio's own errors name server paths; the page's gr.Error messages still show
    )
    key = api_key()
    if key:
        options.update(
            auth=key_login(key),
            auth_message=f"This server needs its API key ({API_KEY_VARIABLE}): any user name, the key as the "
            "password.",
        )
    if app is None:
        return demo, options
    gr.mount_gradio_app(app, demo, path=DEMO_PATH, **options)
    check_file_payloads(demo)
    mounted = next(r.app for r in app.routes if isinstance(r, Mount) and r.path == DEMO_PATH)
    end_page_streams_on_sigterm(app, mounted)
    return demo, options


def http_answer(host: str, port: int):
    """The demo inside the server asks the server's own /predict, so it shows exactly what the API answers."""
    import httpx

    url = f"http://{LOOPBACK[host]}:{port}/predict"
    headers = {"content-type": "application/octet-stream"}
    key = api_key()
    if key:  # the page asked its user for the key already (Gradio's login)
        headers[API_KEY_HEADER] = key

    def answer(data: bytes, explain: bool = False) -> dict:
        params = {"explain": "true"} if explain else None
        response = httpx.post(url, content=data, headers=headers, params=params, timeout=120)
        if response.status_code != 200:
            try:
                detail = response.json().get("detail")
            except ValueError:
                detail = None
            raise ValueError(detail if isinstance(detail, str) else f"HTTP {response.status_code}")
        return response.json()

    return answer


def end_children_with_this_process() -> None:
    """Every process forked from here from now on (LitServe's HTTP servers, its queue manager) ends when this
    one is gone, and on SIGTERM rather than with this process's drain handler. The inference workers,
    started fresh (spawn), watch for it themselves (ImageAPI.setup)."""
    server = os.getpid()

    def in_child() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        end_with_parent(server)

    os.register_at_fork(after_in_child=in_child)


def drain_on_sigterm() -> None:
    """SIGTERM -> let each HTTP process finish its requests in flight (uvicorn's graceful shutdown), then
    leave LitServer.run through its KeyboardInterrupt path, which stops the inference workers."""

    def handler(signum, frame):
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


def build_server(
    cfg: DictConfig, card: ModelCard, index_dir: Path | None, index, private: Path, unknown=None
):
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
        unknown=str(unknown.source) if unknown is not None else None,
    )
    limit = int(float(s.max_upload_mb) * 1024 * 1024)
    server = ls.LitServer(
        api,
        accelerator=s.accelerator,
        devices=s.devices,
        workers_per_device=int(s.workers_per_device),
        timeout=float(s.timeout),
        model_metadata=model_info(card, index, cfg, unknown),
        max_payload_size=limit,
        # FastAPI's /docs and /redoc pages fetch Swagger UI and ReDoc from a CDN: they are off, and so is
        # the /openapi.json they read.
        disable_openapi_url=True,
    )
    server.app.state.max_upload_bytes = limit
    if s.demo:
        mount_demo(server.app, cfg, card, index_dir, index, http_answer(s.host, int(s.port)), private)
    return server


def serve(cfg: DictConfig) -> None:
    card, index_dir, index = prepared(cfg)
    unknown = unknown_detector(cfg, card)
    s = cfg.serve
    check_port_free(s.host, int(s.port))
    with tempfile.TemporaryDirectory(prefix="skuvision-serve-") as tmp:
        private = Path(tmp)
        if s.demo:
            use_private_gradio_dirs(private)
        server = build_server(cfg, card, index_dir, index, private, unknown)
        where = f"http://{LOOPBACK[s.host]}:{s.port}"
        served = f"{card.backend} {Path(card.onnx_path).name}" if card.onnx_path else card.backend
        print(f"serving {card.name} ({served}, sha256 {card.sha256}) on {s.host}:{s.port}")
        print(
            f"  POST {where}/predict   GET {where}/health   GET {where}/info"
            + (f"   {where}/demo" if s.demo else "")
        )
        drain_on_sigterm()
        end_children_with_this_process()
        try:
            server.run(
                host=s.host,
                port=int(s.port),
                num_api_servers=s.get("api_servers"),
                log_level=s.log_level,
                generate_client_file=False,
            )
        except RuntimeError:
            if not worker_failed(server):
                raise
            raise SkuvisionError(
                "serve: the inference worker could not start (its error is logged above); the checkpoint, "
                "the index and serve.accelerator must suit each other"
            ) from None
    print("server stopped")
    gc.freeze()  # the collection at exit would take seconds of a SIGTERM's grace period, for nothing


def worker_failed(server) -> bool:
    from litserve.utils import WorkerSetupStatus

    return any(status == WorkerSetupStatus.ERROR for status in server.workers_setup_status.values())


def demo(cfg: DictConfig) -> None:
    """The page alone: the model runs in this process."""
    set_threads(cfg.get("threads"))
    card, index_dir, index = prepared(cfg)
    check_port_free(cfg.serve.host, int(cfg.serve.port))
    predictor = Predictor(card, index, cfg.top_k, cfg.k, unknown=unknown_detector(cfg, card))

    def answer(data: bytes, explain: bool = False) -> dict:
        try:
            image = predictor.decode(data)
            result = predictor.answer(image[None])[0]
            if explain:
                result["explanation"] = predictor.explain(image[None], [result])[0]
        except BadImage as err:
            raise ValueError(str(err)) from None
        return result

    with tempfile.TemporaryDirectory(prefix="skuvision-demo-") as tmp:
        use_private_gradio_dirs(Path(tmp))
        page, options = mount_demo(None, cfg, card, index_dir, index, answer, Path(tmp))
        print(f"demo page on http://{LOOPBACK[cfg.serve.host]}:{cfg.serve.port}")
        signal.signal(signal.SIGTERM, interrupt)  # Gradio closes on KeyboardInterrupt; the temp folder goes
        page.launch(
            server_name=cfg.serve.host,
            server_port=int(cfg.serve.port),
            share=False,
            **options,
        )
    gc.freeze()  # as serve()
