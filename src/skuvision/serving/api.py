"""The HTTP API on LitServe: POST /predict with one image, answered by inference workers in dynamic batches.

The upload is read and checked in the HTTP process (size, content type, empty body) before anything is queued;
decoding happens per request in the worker, and an image that does not decode becomes that request's own 400,
so one bad upload never fails the batch it shares with good ones.
"""

# No `from __future__ import annotations`: LitServe turns decode_request's annotation into the endpoint's
# parameter, and FastAPI needs it as an object, not a string.

import logging
import multiprocessing
import os
import threading
import time
from dataclasses import dataclass
from typing import Annotated

import litserve as ls
import torch
from fastapi import Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.datastructures import UploadFile

from skuvision.config import set_threads
from skuvision.errors import SkuvisionError
from skuvision.serving.predictor import BadImage, ModelCard, Predictor
from skuvision.unknown import load_detector

log = logging.getLogger("skuvision")

PARENT_POLL_SECONDS = 0.5
UPLOAD_FIELD = "file"
RAW_MEDIA_TYPES = ("application/octet-stream", "")  # "" : a raw body sent without a content type


def end_with_parent(parent: int) -> None:
    """End this process soon after process `parent` is gone, however it ended (SIGKILL, the OOM killer): a
    server's worker re-parented to init would go on holding its model, its port or its queue.

    A watch thread rather than Linux's PR_SET_PDEATHSIG, which fires when the parent *thread* that started
    this process ends. The parent is named by its pid, taken before this process started, so a parent that
    died before the watch began is noticed too."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_POLL_SECONDS)
        log.warning("process %d: the server process %d is gone; exiting", os.getpid(), parent)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@dataclass
class Upload:
    """The bytes of one uploaded image, as queued to an inference worker."""

    data: bytes
    filename: str | None = None
    explain: bool = False


EXPLAIN_VALUES = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False, "": False}


def explain_flag(value) -> bool:
    """The request's `explain` (query parameter or form field): true or false, else a 400 naming it."""
    if value is None:
        return False
    if not isinstance(value, str) or value.strip().lower() not in EXPLAIN_VALUES:
        shown = value if isinstance(value, str) else type(value).__name__
        raise HTTPException(400, f"explain={shown[:40]!r}: use explain=true or explain=false")
    return EXPLAIN_VALUES[value.strip().lower()]


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_upload(request: Request) -> Upload:
    """One image from a multipart form (field `file`) or a raw body, refused with a 4xx when it cannot be one.

    The declared length is checked before the body is read; LitServe's payload-size middleware stops a body
    that grows past the limit while it streams in (sent without a length, or with a false one)."""
    limit = request.app.state.max_upload_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPException(
            413, f"upload of {int(length)} bytes is larger than serve.max_upload_mb ({limit} bytes)"
        )
    kind = media_type(request)
    explain = explain_flag(request.query_params.get("explain"))
    if kind == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get(UPLOAD_FIELD)
        if not isinstance(upload, UploadFile):
            raise HTTPException(400, f"multipart upload without a file field named '{UPLOAD_FIELD}'")
        explain = explain or explain_flag(form.get("explain"))
        data, name = await upload.read(), upload.filename
        await form.close()
    elif kind.startswith("image/") or kind in RAW_MEDIA_TYPES:
        data, name = await request.body(), None
    else:
        raise HTTPException(
            415,
            f"content type {kind!r} is not an image: send multipart/form-data with a '{UPLOAD_FIELD}' field, "
            "or the image bytes as the body (image/* or application/octet-stream)",
        )
    if not data:
        raise HTTPException(400, "empty upload: no image bytes were sent")
    return Upload(data=data, filename=name, explain=explain)


@dataclass
class Decoded:
    """A worker's view of one request: the image at the model's size, or why it is not one."""

    image: torch.Tensor | None
    error: str = ""
    status: int = 200
    explain: bool = False


class ImageAPI(ls.LitAPI):
    """Labels (and similar catalogue items) for one image per request, batched across requests."""

    def __init__(
        self,
        card: ModelCard,
        index_dir: str | None = None,
        top_k: int = 5,
        k: int = 5,
        threads: int | None = None,
        max_batch_size: int = 1,
        batch_timeout: float = 0.0,
        unknown: str | None = None,
    ):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout)
        self.card, self.index_dir, self.top_k, self.k, self.threads = card, index_dir, top_k, k, threads
        self.unknown = unknown  # unknown.json, checked in serve.py before the server starts

    def setup(self, device) -> None:
        # Runs in each inference worker; LitServe's /health answers 200 only once every worker got here.
        from skuvision.serving.catalogue import load_index

        parent = multiprocessing.parent_process()  # serve.py's process, which started this worker
        if parent is not None:
            end_with_parent(parent.pid)
        set_threads(self.threads)
        try:
            index = load_index(self.index_dir) if self.index_dir else None
            detector = (
                load_detector(self.unknown, self.card.checkpoint, self.card.tta) if self.unknown else None
            )
            self.predictor = Predictor(
                self.card, index, self.top_k, self.k, device=str(device), unknown=detector
            )
        except SkuvisionError as err:
            log.error("error: %s", err)  # the one line to read above LitServe's traceback
            raise

    def decode_request(self, request: Annotated[Upload, Depends(read_upload)]) -> Decoded:
        try:
            return Decoded(self.predictor.decode(request.data), explain=request.explain)
        except BadImage as err:
            return Decoded(None, str(err), err.status)

    def batch(self, inputs: list[Decoded]) -> list[Decoded]:
        return list(inputs)  # predict stacks the good ones itself

    def predict(self, x: Decoded | list[Decoded]) -> dict | list[dict]:
        items = x if isinstance(x, list) else [x]
        good = [d for d in items if d.image is not None]
        answered = self.predictor.answer(torch.stack([d.image for d in good])) if good else []
        asked = [(d, a) for d, a in zip(good, answered, strict=True) if d.explain]
        if asked:  # only these images pay for the backward pass
            try:
                shown = self.predictor.explain(
                    torch.stack([d.image for d, _ in asked]), [a for _, a in asked]
                )
                for (_, answer), explanation in zip(asked, shown, strict=True):
                    answer["explanation"] = explanation
            except BadImage as err:  # refused for this server (the ONNX backend): each asking request's 4xx
                for d, _ in asked:
                    d.image, d.error, d.status = None, str(err), err.status
        answers = iter(a for d, a in zip(good, answered, strict=True) if d.image is not None)
        out = [
            {**next(answers), "batch": len(items)}  # requests decoded together: batching is visible
            if d.image is not None
            else {"status": d.status, "detail": d.error}
            for d in items
        ]
        return out if isinstance(x, list) else out[0]

    def unbatch(self, output: list[dict]) -> list[dict]:
        return output

    def encode_response(self, output: dict) -> Response:
        # A response object, not a raised HTTPException: LitServe would send one raised error to the whole
        # batch.
        if "status" in output:
            return JSONResponse({"detail": output["detail"]}, status_code=output["status"])
        return JSONResponse(output)
