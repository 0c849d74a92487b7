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
- pytorch-lightning gives its logger a stderr handler of its own (and stops propagation) when it is imported
  before logging is configured (pytorch-lightning 2.6.6, `pytorch_lightning/__init__.py`; in
  `lightning_logs_on_stderr`);
- LitServe names its HTTP processes `LitServer-<n>` (litserve 0.2.19);
- a Gradio page mounted with `gr.mount_gradio_app` is never marked as launched, so Gradio skips its path
  checks on file payloads, and nothing ends its pages' heartbeat streams on shutdown (gradio 6.31.0:
  `Blocks.has_launched`, `App.stop_event`, in `check_file_payloads` and `end_page_streams`);
- known-harmless messages of Lightning, torch, LitServe and the ONNX optimiser, dropped where they are emitted
  (`KNOWN_WARNINGS`, `KNOWN_LOG_LINES`, `CHATTY_LOGGERS`, `TEST_AFTER_FIT`, each with its version), and
  cleanvision's progress bars, drawn whatever the stream is (cleanvision 0.3.7:
  `progress_bars_only_on_a_terminal`).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# torch and Lightning are imported where they are used: the commands import this before Hydra composes a
# config, and a config mistake is answered without loading them.
log = logging.getLogger("skuvision")

# Private torch helpers (torch 2.14.1) that tell whether the CPU runs bf16 natively.
NATIVE_BF16_CHECKS = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast about doubles training speed there, and is emulated (slower than
    float32) elsewhere."""
    import torch

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


@dataclass(frozen=True)
class Noise:
    """A library's message that says nothing a skuvision user can act on. `message`: a regular expression
    matched at the message's start; a warning also by its `category` and the exact `module` it is attributed
    to, a log line by the exact `logger` that emits it (and, where `raised` is given, only when the record
    carries one of those exceptions)."""

    why: str
    message: str
    category: type[Warning] = Warning
    module: str = ""
    logger: str = ""
    raised: tuple[type[BaseException], ...] = ()


KNOWN_WARNINGS = (
    Noise(
        "torch 2.14.1 deprecates LeafSpec, which pytorch-lightning 2.6.6 builds for every batch it moves",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module="pytorch_lightning.utilities._pytree",
    ),
    Noise(
        "the model summary's size in MB assumes 32 bits under bf16-mixed (pytorch-lightning 2.6.6); its "
        "parameter counts are right",
        message=r"Precision bf16-mixed is not supported by the model summary",
        category=UserWarning,
        module="pytorch_lightning.utilities.model_summary.model_summary",
    ),
    Noise(
        "an epoch shorter than trainer.log_every_n_steps (pytorch-lightning 2.6.6): skuvision logs its "
        "metrics per epoch; only train/loss_step follows the interval",
        message=r"The number of training batches \(\d+\) is smaller than the logging interval",
        category=UserWarning,
        module="pytorch_lightning.loops.fit_loop",
    ),
)

KNOWN_LOG_LINES = (
    # pytorch-lightning 2.6.6 advertises litlogger and litmodels at INFO with every Trainer it builds.
    Noise(
        "Lightning's tips to install its cloud products",
        message=r"💡 Tip: ",
        logger="pytorch_lightning.utilities.rank_zero",
    ),
    # litserve 0.2.19: its worker monitor asks the multiprocessing manager every 2 s whether to stop; when
    # the manager has gone at shutdown, the question fails and a traceback is logged at ERROR.
    Noise(
        "LitServe's monitor losing its manager at shutdown",
        message=r"Monitoring worker crashed$",
        logger="litserve.server",
        raised=(BrokenPipeError, ConnectionResetError, EOFError),
    ),
)

# The ONNX optimiser logs every pass at INFO (onnxscript 0.7.2, onnx-ir 1.1.0: about 60 lines for an
# EfficientNet); their warnings and errors still show.
CHATTY_LOGGERS = ("onnx_ir.passes", "onnxscript.optimizer", "onnxscript.rewriter")

# The test after fit runs on a Trainer without the fit's callbacks: their states in the checkpoint are for
# resuming a fit, so pytorch-lightning 2.6.6's advice to add them is noise there (and only there).
TEST_AFTER_FIT = Noise(
    "the tester has none of the fit's callbacks, on purpose",
    message=r"Be aware that when using `ckpt_path`, callbacks used to create the checkpoint need to be",
    category=UserWarning,
    module="pytorch_lightning.trainer.call",
)


def ignore_warning(noise: Noise) -> None:
    warnings.filterwarnings(
        "ignore", message=noise.message, category=noise.category, module=re.escape(noise.module) + r"\Z"
    )


class DropLines(logging.Filter):
    """Drops the records of its logger whose message starts as one of `noises` says; passes all others."""

    def __init__(self, noises: tuple[Noise, ...]):
        super().__init__()
        self.patterns = [(re.compile(noise.message), noise.raised) for noise in noises]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        raised = record.exc_info[0] if record.exc_info else None
        return not any(
            pattern.match(message) and (not kinds or (raised is not None and issubclass(raised, kinds)))
            for pattern, kinds in self.patterns
        )


def quiet_known_noise() -> None:
    """Install the filters of `KNOWN_WARNINGS`, `KNOWN_LOG_LINES` and `CHATTY_LOGGERS` (every command does,
    before its task runs); calling it again adds nothing."""
    for noise in KNOWN_WARNINGS:
        ignore_warning(noise)
    for name in {noise.logger for noise in KNOWN_LOG_LINES}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, DropLines) for f in logger.filters):
            logger.addFilter(DropLines(tuple(n for n in KNOWN_LOG_LINES if n.logger == name)))
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def lightning_logs_on_stderr() -> None:
    """What importing pytorch-lightning before Hydra configures logging did to its logger: its INFO lines
    (devices, SLURM requeueing) on stderr, not in <task>.log. The commands import it later now, after Hydra
    gave the root logger handlers, where Lightning would propagate to them instead."""
    if "pytorch_lightning" in sys.modules:
        return
    logger = logging.getLogger("pytorch_lightning")
    if not logger.handlers:
        logger.addHandler(logging.StreamHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def testing_after_fit() -> Iterator[None]:
    """Around the test of a checkpoint the fit just wrote: `TEST_AFTER_FIT` is not shown."""
    with warnings.catch_warnings():
        ignore_warning(TEST_AFTER_FIT)
        yield


def progress_bars_only_on_a_terminal() -> None:
    """cleanvision's issue managers draw tqdm bars on stderr whatever it is (cleanvision 0.3.7: tens of KB
    of carriage returns in a log file); their `tqdm` becomes one with tqdm's `disable=None`, which draws only
    where the stream is a terminal."""
    from cleanvision.issue_managers import duplicate_issue_manager, image_property_issue_manager

    for module in (duplicate_issue_manager, image_property_issue_manager):
        if not isinstance(module.tqdm, functools.partial):
            module.tqdm = functools.partial(module.tqdm, disable=None)
