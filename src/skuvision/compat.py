"""Workarounds for behaviours of the libraries skuvision runs on, each for the version named beside it, with a
test in tests/test_compat.py that fails when that behaviour changes. Imports nothing of skuvision: any module
may use it.

- Lightning's CSV logger empties metrics.csv when its writer starts, and a writer that did not write the file
  fails when it adds columns to it (pytorch-lightning 2.6.6);
- torch names no public check for native bf16 on the CPU (torch 2.14.1: `torch.cpu._is_avx512_bf16_supported`,
  `torch.cpu._is_amx_tile_supported`, in `cpu_has_native_bf16`);
- Lightning's DDP launcher starts ranks other than zero by re-running the command line with LOCAL_RANK set and
  `hydra.output_subdir=null` (pytorch-lightning 2.6.6: `_hydra_subprocess_cmd`, in `rerun_by_lightning_ddp`);
- litdata's obstore client refuses plain-http endpoints (litdata 0.2.76: `_OBSTORE_AVAILABLE`);
- torch's AveragedModel reads its update counter on the host at every update (torch 2.14.1), and Lightning's
  WeightAveraging keeps it in `_average_model` with no way to update it otherwise (pytorch-lightning 2.6.6:
  `replace_averaging_update`);
- torchmetrics' multilabel precision-recall metrics check on every update whether their inputs are logits,
  a host read on the CPU, and keep probabilities in list states `preds` and `target` (torchmetrics 1.9.0:
  `store_probabilities`);
- torch.compile's inductor backend finds its C++ compiler only when it first compiles, inside the first
  training step (torch 2.14.1: `torch._inductor.cpp_builder.get_cpp_compiler`, in `inductor_cpp_compiler`);
- LitServe names its HTTP processes `LitServer-<n>` (litserve 0.2.19);
- a Gradio page mounted with `gr.mount_gradio_app` is never marked as launched, so Gradio skips its path
  checks on file payloads, and nothing ends its pages' heartbeat streams on shutdown (gradio 6.31.0:
  `Blocks.has_launched`, `App.stop_event`, in `check_file_payloads` and `end_page_streams`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import torch

# Lightning is imported where it is used: config's precision resolver and every litdata worker import this.
log = logging.getLogger("skuvision")

# Private torch helpers (torch 2.14.1) that tell whether the CPU runs bf16 natively.
NATIVE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast about doubles training speed there, and is emulated (slower than
    float32) elsewhere."""
    return any(getattr(torch.cpu, name, lambda: False)() for name in NATIVE_BF16_CHECKS)


def rerun_by_lightning_ddp(output_subdir: str | None) -> bool:
    """Whether Lightning's DDP launcher started this process (a rank other than zero) by re-running rank
    zero's command into rank zero's run folder; `output_subdir`: the composed hydra.output_subdir."""
    return os.environ.get("LOCAL_RANK", "0") != "0" and output_subdir is None


def keep_earlier_csv_rows(loggers: list) -> None:
    """The CSV writer deletes metrics.csv when it starts; a run that re-enters its folder (a requeued job
    resuming from last.ckpt) keeps the rows of its earlier attempts instead."""
    from pytorch_lightning.loggers import CSVLogger
    from pytorch_lightning.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return
    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.log_dir) / "metrics.csv"
            earlier = path.read_text() if path.is_file() else ""
            if earlier:
                logger.experiment  # noqa: B018  (starts the writer, which deletes the file)
                path.write_text(earlier)
                continue_csv_logs([logger])


def continue_csv_logs(loggers: list) -> None:
    """A CSV writer that did not write metrics.csv itself (the main process after ddp_spawn, a resumed run)
    must know the file's columns, or it fails when it adds new ones (the test metrics)."""
    from pytorch_lightning.loggers import CSVLogger

    for logger in loggers:
        if isinstance(logger, CSVLogger):
            path = Path(logger.experiment.metrics_file_path)
            if path.is_file():
                header = path.read_text().splitlines()[0].split(",")
                logger.experiment.metrics_keys = sorted(set(logger.experiment.metrics_keys) | set(header))


def replace_averaging_update(callback, update):
    """Lightning's WeightAveraging builds a torch AveragedModel in `setup`, keeps it in `_average_model`
    (pytorch-lightning 2.6.6) and calls its `update_parameters(pl_module)` after each optimizer step it
    chooses; torch's reads the model's `n_averaged` on the host twice per call (torch 2.14.1), a GPU sync.
    On this one instance that method becomes `update`; its state, the checkpoint's keys and Lightning's
    hooks stay as they are. Returns the AveragedModel."""
    from torch.optim.swa_utils import AveragedModel

    average = getattr(callback, "_average_model", None)
    if not isinstance(average, AveragedModel):
        raise RuntimeError(
            "Lightning's WeightAveraging no longer keeps an AveragedModel in `_average_model` after setup: "
            "adapt skuvision.compat.replace_averaging_update to this Lightning version"
        )
    average.update_parameters = update
    return average


def store_probabilities(metric, preds, target) -> None:
    """The update of a torchmetrics multilabel precision-recall metric without thresholds (average
    precision's), given probabilities [rows, labels] and 0/1 targets: appended to its `preds` and `target`
    states as its own update would (torchmetrics 1.9.0), without its check whether `preds` are logits, which
    reads them on the host on the CPU (`normalize_logits_if_needed`)."""
    metric.preds.append(preds)
    metric.target.append(target)


def inductor_cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's default backend (inductor) would build its kernels with ($CXX, else
    g++; torch 2.14.1), or None where it finds none: it would fail only at the first compiled step."""
    from torch._inductor import exc
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        return get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


# LitServe names its HTTP server processes LitServer-<n> (checked against litserve 0.2.19; the SIGTERM test
# in tests/test_serve.py fails if that changes): tasks.serve drains them on SIGTERM.
LITSERVE_API_PROCESS = "LitServer-"


def use_boto3_for_plain_http() -> None:
    """litdata's obstore client refuses plain-http endpoints (an on-premises S3 such as MinIO, or an emulator
    on 127.0.0.1); with AWS_ENDPOINT_URL=http://... litdata is switched to its boto3 client.

    `_OBSTORE_AVAILABLE` is private to litdata (checked with litdata 0.2.76; tests/test_streaming.py
    notices a change). Called at import, so litdata's spawned workers, which import this module to unpickle
    what they run, take the same client.
    """
    if not os.environ.get("AWS_ENDPOINT_URL", "").startswith("http://"):
        return
    import litdata.streaming.downloader as downloader

    if downloader._OBSTORE_AVAILABLE:
        log.info("AWS_ENDPOINT_URL is plain http: litdata reads and writes it through boto3")
        downloader._OBSTORE_AVAILABLE = False


def check_file_payloads(blocks) -> None:
    """Make Gradio check every file payload sent to a mounted page's event API as it does for a launched one:
    only files uploaded through the page pass (blocked_paths first), before anything is copied.

    Gradio reads `Blocks.has_launched` for this, and only `launch()` sets it (gradio 6.31.0,
    processing_utils._check_allowed); without it a FileData naming any readable file is copied into the
    page's cache and served. tests/test_compat.py notices a change."""
    blocks.has_launched = True


def end_page_streams(gradio_app, loop: asyncio.AbstractEventLoop) -> None:
    """End the heartbeat stream each open page of a mounted Gradio app holds, so a graceful shutdown does not
    wait out uvicorn's timeout for them. Gradio ends them on `App.stop_event`, which only its own server sets
    (gradio 6.31.0). Safe in a signal handler: the event is set on the app's event loop `loop`."""
    loop.call_soon_threadsafe(gradio_app.stop_event.set)
