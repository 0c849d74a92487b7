"""The behaviours of Lightning, torch, litdata and Gradio that skuvision.compat works around, at the versions
named there. A failure here means the behaviour changed: adapt or drop the workaround, then this test."""

import contextlib
import csv
import functools
import io
import logging
import re
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning import LightningModule, Trainer
from pytorch_lightning.callbacks import WeightAveraging
from pytorch_lightning.loggers import CSVLogger
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, TensorDataset

from skuvision.compat import (
    CHATTY_LOGGERS,
    KNOWN_LOG_LINES,
    KNOWN_WARNINGS,
    NATIVE_BF16_CHECKS,
    TEST_AFTER_FIT,
    DropLines,
    check_file_payloads,
    continue_csv_logs,
    cpu_has_native_bf16,
    end_page_streams,
    inductor_cpp_compiler,
    keep_earlier_csv_rows,
    progress_bars_only_on_a_terminal,
    quiet_known_noise,
    replace_averaging_update,
    store_probabilities,
    testing_after_fit,
)
from skuvision.host_reads import counting_host_reads


def rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_lightning_csv_writer_deletes_metrics_csv_when_it_starts(tmp_path):
    logger = CSVLogger(tmp_path, name="csv", version="")
    metrics = tmp_path / "csv" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("epoch,step,val/acc\n0,10,0.5\n")
    with pytest.warns(UserWarning, match="Previous log files in this directory will be deleted"):
        logger.experiment  # noqa: B018
    assert not metrics.exists()


def test_keep_earlier_csv_rows_survives_that(tmp_path):
    metrics = tmp_path / "csv" / "metrics.csv"
    metrics.parent.mkdir(parents=True)
    metrics.write_text("epoch,step,val/acc\n0,10,0.5\n")
    logger = CSVLogger(tmp_path, name="csv", version="")
    keep_earlier_csv_rows([logger])
    logger.log_metrics({"epoch": 1, "val/acc": 0.75, "test/acc": 0.7}, step=20)
    logger.save()
    assert [(r["epoch"], r["val/acc"], r["test/acc"]) for r in rows(metrics)] == [
        ("0", "0.5", ""),
        ("1", "0.75", "0.7"),
    ]


def writer_that_did_not_write_the_file(tmp_path):
    """The main process after ddp_spawn: its writer started before the spawned processes wrote the file."""
    logger = CSVLogger(tmp_path, name="csv", version="")
    logger.experiment  # noqa: B018
    metrics = tmp_path / "csv" / "metrics.csv"
    metrics.write_text("epoch,step,val/acc\n0,10,0.5\n")
    logger.log_metrics({"test/acc": 0.7}, step=11)
    return logger, metrics


def test_lightning_csv_writer_fails_to_add_columns_to_a_file_it_did_not_write(tmp_path):
    logger, _ = writer_that_did_not_write_the_file(tmp_path)
    with pytest.raises(ValueError, match="dict contains fields not in fieldnames"):
        logger.save()


def test_continue_csv_logs_adds_the_columns(tmp_path):
    logger, metrics = writer_that_did_not_write_the_file(tmp_path)
    continue_csv_logs([logger])
    logger.save()
    assert [(r["val/acc"], r["test/acc"]) for r in rows(metrics)] == [("0.5", ""), ("", "0.7")]


def test_torch_still_has_the_private_bf16_checks():
    for name in NATIVE_BF16_CHECKS:
        assert isinstance(getattr(torch.cpu, name)(), bool), name
    assert isinstance(cpu_has_native_bf16(), bool)


def mounted_page(tmp_path, monkeypatch):
    """A one-input Gradio page mounted on a FastAPI app as serve.py mounts its demo; uploads in tmp_path."""
    import gradio as gr
    from fastapi import FastAPI

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "uploads"))
    with gr.Blocks(analytics_enabled=False) as page:
        image = gr.Image(type="filepath")
        text = gr.Textbox()
        gr.Button().click(lambda path: "read", [image], [text], api_name="read")
    app = FastAPI()
    gr.mount_gradio_app(app, page, path="/page", show_error=False)
    return app, page


@pytest.mark.parametrize("guarded", [False, True])
def test_gradio_checks_file_payloads_of_a_mounted_page_once_marked_launched(tmp_path, monkeypatch, guarded):
    from fastapi.testclient import TestClient

    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("SECRET-BYTES\n")
    app, page = mounted_page(tmp_path, monkeypatch)
    assert page.has_launched is False  # mount_gradio_app leaves it unset; when it does not, drop the guard
    if guarded:
        check_file_payloads(page)
    payload = {"data": [{"path": str(secret), "meta": {"_type": "gradio.FileData"}}]}
    with TestClient(app) as client:
        event = client.post("/page/gradio_api/call/read", json=payload).json()["event_id"]
        stream = client.get(f"/page/gradio_api/call/read/{event}").text
    copies = [p for p in (tmp_path / "uploads").rglob("*") if p.is_file() and b"SECRET" in p.read_bytes()]
    if guarded:
        assert "event: error" in stream and "event: complete" not in stream, stream
        assert not copies and str(secret) not in stream
    else:  # gradio 6.31.0 copies any readable file a mounted page is sent into the page's cache
        assert copies


def test_setting_a_mounted_apps_stop_event_ends_its_heartbeat_streams(tmp_path, monkeypatch):
    import asyncio
    import threading

    from fastapi.testclient import TestClient
    from starlette.routing import Mount

    app, _ = mounted_page(tmp_path, monkeypatch)
    mounted = next(r.app for r in app.routes if isinstance(r, Mount))
    lines: list[str] = []
    with TestClient(app) as client:
        loop = client.portal.call(asyncio.get_running_loop)
        with client.stream("GET", "/page/gradio_api/heartbeat/session") as stream:

            def read() -> None:
                lines.extend(stream.iter_lines())

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            reader.join(2)
            assert reader.is_alive()  # a page's heartbeat stream stays open...
            end_page_streams(mounted, loop)
            reader.join(10)
            assert not reader.is_alive()  # ...until the stop event is set
    assert "data: ALIVE" in lines


class Linear(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)


def test_torchs_averaged_model_reads_its_counter_on_the_host_at_every_update():
    model = Linear()
    average = AveragedModel(model, use_buffers=True)
    average.update_parameters(model)
    with counting_host_reads() as reads:
        average.update_parameters(model)
    assert [method for method, _ in reads.reads[None]] == ["__bool__", "__bool__"]  # when gone: drop ours


def test_lightnings_weight_averaging_updates_the_averaged_model_it_keeps_in_average_model():
    model, calls = Linear(), []
    callback = WeightAveraging()
    callback.setup(None, model, "fit")
    average = replace_averaging_update(callback, calls.append)
    assert isinstance(average, AveragedModel) and average.module is not model
    callback.on_train_batch_end(SimpleNamespace(global_step=1), model, None, None, 0)
    assert calls == [model]
    assert set(average.state_dict()) == {"n_averaged", "module.layer.weight", "module.layer.bias"}
    with pytest.raises(RuntimeError, match="replace_averaging_update"):
        replace_averaging_update(WeightAveraging(), calls.append)  # before setup: nothing to replace


def test_torchmetrics_reads_multilabel_probabilities_on_the_host_and_keeps_them_in_preds_and_target():
    from torchmetrics.classification import MultilabelAveragePrecision

    probabilities, target = torch.rand(8, 3), torch.randint(0, 2, (8, 3))
    theirs, ours = MultilabelAveragePrecision(3, validate_args=False), MultilabelAveragePrecision(3)
    with counting_host_reads() as reads:
        theirs.update(probabilities, target)
    assert "__bool__" in [method for method, _ in reads.reads[None]]  # when gone: drop ours
    store_probabilities(ours, probabilities, target)
    assert all(
        torch.equal(a, b) for a, b in zip(ours.preds + ours.target, theirs.preds + theirs.target, strict=True)
    )
    assert ours.compute() == theirs.compute()


def test_lightning_ddp_reruns_the_command_with_local_rank_and_no_output_subdir(monkeypatch):
    """NewRunFolder lets such a process into rank zero's run folder (rerun_by_lightning_ddp)."""
    import inspect
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig
    from lightning_fabric.strategies.launchers import subprocess_script

    from skuvision.compat import rerun_by_lightning_ddp

    monkeypatch.setattr(
        HydraConfig, "get", staticmethod(lambda: SimpleNamespace(run=SimpleNamespace(dir="r")))
    )
    monkeypatch.setattr("hydra.utils.get_original_cwd", lambda: "/")
    command, _ = subprocess_script._hydra_subprocess_cmd(local_rank=1)
    assert "hydra.output_subdir=null" in command and 'hydra.run.dir="r"' in command
    launcher = inspect.getsource(subprocess_script._SubprocessScriptLauncher._call_children_scripts)
    assert 'env_copy["LOCAL_RANK"] = f"{local_rank}"' in launcher
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rerun_by_lightning_ddp(None) and not rerun_by_lightning_ddp(".hydra")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not rerun_by_lightning_ddp(None)


# Known-harmless library messages (skuvision.compat's KNOWN_WARNINGS, KNOWN_LOG_LINES, CHATTY_LOGGERS,
# TEST_AFTER_FIT): each test makes the library say its message, shows it without the filter (a changed
# message fails here) and gone with it, while an unrelated message of the same place still shows.


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def pristine_logging():
    """The noise filters' loggers as the libraries leave them; restored afterwards."""
    loggers = [logging.getLogger(n) for n in {*CHATTY_LOGGERS, *(x.logger for x in KNOWN_LOG_LINES)}]
    saved = [(logger, logger.level, list(logger.filters)) for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.NOTSET)
        for f in [f for f in logger.filters if isinstance(f, DropLines)]:
            logger.removeFilter(f)
    yield
    for logger, level, filters in saved:
        logger.setLevel(level)
        logger.filters[:] = filters


class TinyModule(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        (x,) = batch
        warnings.warn("a warning of the model's own", UserWarning, stacklevel=1)
        return self.layer(x).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def tiny_fit(tmp_path, quiet: bool) -> tuple[list[str], list[str]]:
    """A one-step fit in bf16-mixed with a CSV logger and 3 batches an epoch: (warnings, Lightning's log)."""
    lightning_log = Records()
    logging.getLogger(KNOWN_LOG_LINES[0].logger).addHandler(lightning_log)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            if quiet:
                quiet_known_noise()
            trainer = Trainer(
                accelerator="cpu",
                precision="bf16-mixed",
                max_steps=1,
                logger=CSVLogger(tmp_path),
                enable_checkpointing=False,
                enable_progress_bar=False,
                log_every_n_steps=50,
            )
            data = DataLoader(TensorDataset(torch.randn(6, 4)), batch_size=2)
            trainer.fit(TinyModule(), train_dataloaders=data)
    finally:
        logging.getLogger(KNOWN_LOG_LINES[0].logger).removeHandler(lightning_log)
    return [str(w.message) for w in seen], lightning_log.messages


def said(messages: list[str], noise) -> bool:
    return any(re.match(noise.message, m) for m in messages)


def test_lightnings_known_noise_is_dropped_and_nothing_else(tmp_path, pristine_logging):
    shown, logged = tiny_fit(tmp_path / "loud", quiet=False)
    assert all(said(shown, noise) for noise in KNOWN_WARNINGS), shown
    assert said(logged, KNOWN_LOG_LINES[0]), logged
    shown_quiet, logged_quiet = tiny_fit(tmp_path / "quiet", quiet=True)
    assert not any(said(shown_quiet, noise) for noise in KNOWN_WARNINGS), shown_quiet
    assert not said(logged_quiet, KNOWN_LOG_LINES[0])
    # Everything else still shows: the model's own warning, Lightning's device lines.
    others = [m for m in shown if not any(said([m], noise) for noise in KNOWN_WARNINGS)]
    assert "a warning of the model's own" in others
    assert shown_quiet == others
    assert logged_quiet == [m for m in logged if not said([m], KNOWN_LOG_LINES[0])]
    assert any(m.startswith("GPU available") for m in logged_quiet)


def test_a_known_message_from_elsewhere_or_another_message_from_there_still_shows():
    leafspec = KNOWN_WARNINGS[0]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()
        text = "`isinstance(treespec, LeafSpec)` is deprecated, use ..."
        warnings.warn_explicit(text, FutureWarning, "ours.py", 1, module="skuvision.somewhere")
        warnings.warn_explicit("something else", FutureWarning, "_pytree.py", 1, module=leafspec.module)
        warnings.warn_explicit(text, FutureWarning, "_pytree.py", 1, module=leafspec.module)
    assert [str(w.message) for w in seen] == [text, "something else"]


def test_the_ckpt_path_callbacks_warning_is_dropped_only_in_the_test_after_fit():
    from pytorch_lightning.trainer.call import _call_callbacks_on_load_checkpoint

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    checkpoint = {"callbacks": {"WeightEMA": {}}, "pytorch-lightning_version": "2.6.6"}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_known_noise()  # not among the filters every command installs: a resumed fit needs it
        _call_callbacks_on_load_checkpoint(trainer, checkpoint)
        with testing_after_fit():
            _call_callbacks_on_load_checkpoint(trainer, checkpoint)
            warnings.warn("another warning", UserWarning, stacklevel=1)
        _call_callbacks_on_load_checkpoint(trainer, checkpoint)
    messages = [str(w.message) for w in seen]
    assert [said([m], TEST_AFTER_FIT) for m in messages] == [True, False, True], messages
    assert messages[1] == "another warning" and "WeightEMA" in messages[0]


def test_the_onnx_optimisers_info_lines_are_dropped_and_its_warnings_show(pristine_logging):
    import onnx
    import onnxscript.optimizer
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Neg", ["x"], ["unused"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    tops = [logging.getLogger(name.split(".")[0]) for name in CHATTY_LOGGERS]
    records = Records()
    for top in tops:  # as Hydra's job logging leaves them: INFO through the root
        top.setLevel(logging.INFO)
        top.addHandler(records)
    try:
        onnxscript.optimizer.optimize(onnx.ModelProto.FromString(model.SerializeToString()))
        loud = list(records.messages)
        records.messages.clear()
        quiet_known_noise()
        onnxscript.optimizer.optimize(onnx.ModelProto.FromString(model.SerializeToString()))
        for name in CHATTY_LOGGERS:
            logging.getLogger(f"{name}.anything").warning("a warning of %s", name)
    finally:
        for top in tops:
            top.setLevel(logging.NOTSET)
            top.removeHandler(records)
    assert any(m.startswith("Removed 1 unused nodes") for m in loud), loud
    assert records.messages == [f"a warning of {name}" for name in CHATTY_LOGGERS]


def test_cleanvision_draws_its_bars_only_on_a_terminal(tmp_path, monkeypatch):
    from cleanvision import Imagelab
    from cleanvision.issue_managers import duplicate_issue_manager, image_property_issue_manager
    from PIL import Image

    for module in (duplicate_issue_manager, image_property_issue_manager):
        # cleanvision's own tqdm (an audit earlier in this process may have wrapped it), put back after
        own = module.tqdm.func if isinstance(module.tqdm, functools.partial) else module.tqdm
        monkeypatch.setattr(module, "tqdm", own)
    paths = []
    for k in range(3):
        paths.append(str(tmp_path / f"{k}.png"))
        Image.new("RGB", (16, 16), (k * 60, 0, 0)).save(paths[-1])

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    def stderr_of_a_check(stream: io.StringIO) -> str:
        with contextlib.redirect_stderr(stream):
            Imagelab(filepaths=paths, verbose=False).find_issues(
                {"dark": {}, "exact_duplicates": {}}, verbose=False
            )
        return stream.getvalue()

    assert "Computing scores" in stderr_of_a_check(io.StringIO())  # cleanvision's own: bars into a log file
    progress_bars_only_on_a_terminal()
    assert stderr_of_a_check(io.StringIO()) == ""
    on_terminal = stderr_of_a_check(Terminal())
    assert "Computing scores" in on_terminal and "Computing hashes" in on_terminal


def test_litservers_monitor_losing_its_manager_at_shutdown_is_dropped_and_other_crashes_show(
    pristine_logging,
):
    import litserve as ls

    class Echo(ls.LitAPI):
        def setup(self, device):
            pass

        def predict(self, x):
            return x

    class GoneManager:
        """The manager's Event once the manager process has ended (as at shutdown), or broken otherwise."""

        def __init__(self, error: BaseException):
            self.error = error

        def is_set(self):
            raise self.error

    def monitor_fails_with(error: BaseException) -> list[str]:
        server = ls.LitServer(Echo(), accelerator="cpu")
        server._shutdown_event = GoneManager(error)
        records = Records()
        logging.getLogger("litserve.server").addHandler(records)
        try:
            server._start_worker_monitoring(None, {})
            for thread in threading.enumerate():
                if thread.name == "litserve-monitoring":
                    thread.join(10)
        finally:
            logging.getLogger("litserve.server").removeHandler(records)
        return records.messages

    assert monitor_fails_with(BrokenPipeError(32, "Broken pipe")) == ["Monitoring worker crashed"]
    quiet_known_noise()
    assert monitor_fails_with(BrokenPipeError(32, "Broken pipe")) == []
    assert monitor_fails_with(EOFError()) == []
    assert monitor_fails_with(RuntimeError("a real crash")) == ["Monitoring worker crashed"]


def test_inductor_finds_its_cpp_compiler_only_through_its_private_search():
    """torch.compile's inductor looks for $CXX, else g++, when it first compiles (torch 2.14.1)."""
    from torch._inductor import config

    found = inductor_cpp_compiler()
    assert found is None or found == config.cpp.cxx[-1]
    with config.patch({"cpp.cxx": (None, "/nonexistent/g++")}):
        assert inductor_cpp_compiler() is None


def test_lightning_gives_its_logger_a_stderr_handler_when_imported_before_logging_is_configured():
    """What compat.lightning_logs_on_stderr does for the commands, which import Lightning after Hydra's
    logging set-up: Lightning's own behaviour when imported first (pytorch-lightning 2.6.6)."""
    from tests.helpers import printed_by

    code = (
        "import logging, sys, pytorch_lightning\n"
        "lg = logging.getLogger('pytorch_lightning')\n"
        "print([type(h).__name__ for h in lg.handlers], lg.propagate, lg.level)\n"
    )
    assert printed_by(code) == "['StreamHandler'] False 20"
