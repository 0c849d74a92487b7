"""The training step reads no tensor value on the host between logging intervals (a GPU would wait for each):
the default recipe with its callbacks, the weight EMA among them, with one head or several."""

import pytest
import torch
from pytorch_lightning import Callback, seed_everything
from rich.console import Console

from skuvision.assembly import build, build_trainer, instantiate_callbacks, instantiate_loggers
from skuvision.callbacks import ProgressBar
from skuvision.host_reads import ReadsPerStep, counting_host_reads
from tests.conftest import catalogue_overrides
from tests.helpers import compose_cfg, quick_overrides

LOG_EVERY = 1000  # only the first step logs; the last runs into validation
STEPS = 6


def test_the_counter_sees_every_kind_of_read():
    value, index = torch.tensor(1.5), torch.tensor(1)
    with counting_host_reads() as reads:
        value.item(), bool(value), float(value), int(value), value.tolist(), value.cpu(), value.numpy()
        [0, 1][index]  # noqa: B018
        _ = value + 1, value > 0  # arithmetic stays on the device
    assert [method for method, _ in reads.reads[None]] == [
        "item",
        "__bool__",
        "__float__",
        "__int__",
        "tolist",
        "cpu",
        "numpy",
        "__index__",
    ]
    assert "test_host_reads.py" in reads.reads[None][0][1]  # where it came from
    assert "item" not in vars(torch.Tensor)  # the methods are torch's own again


class SyncsAreErrors(Callback):
    """Under torch.cuda.set_sync_debug_mode("error") in the steps that do not log: a sync there raises."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        quiet = 0 < trainer.global_step < STEPS - 1
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")


def fit_counting_reads(tmp_path, overrides: list[str], extra_callbacks=()) -> tuple:
    overrides = overrides + [
        "trainer.max_epochs=1",
        f"trainer.limit_train_batches={STEPS}",
        "trainer.limit_val_batches=1",
        "trainer.num_sanity_val_steps=0",
        f"trainer.log_every_n_steps={LOG_EVERY}",
        "test=false",
    ]
    cfg = compose_cfg("train", overrides, tmp_path / "run")
    assert cfg.callbacks.ema is not None  # the EMA is on, as in the default recipe
    seed_everything(cfg.seed, workers=True)
    datamodule, module = build(cfg)
    with counting_host_reads() as reads:
        per_step = ReadsPerStep(reads)
        callbacks = instantiate_callbacks(cfg.callbacks) + [per_step, *extra_callbacks]
        trainer = build_trainer(cfg, instantiate_loggers(cfg.logger), callbacks)
        trainer.fit(module, datamodule=datamodule)
    return reads, per_step, trainer


def assert_quiet_steps_read_nothing(reads, per_step) -> None:
    quiet = per_step.quiet_steps()
    assert quiet == list(range(1, STEPS - 1)), per_step.steps
    for step in quiet:
        assert reads.count(step) == 0, reads.describe(step)


def test_training_steps_read_nothing_on_the_host_between_logging_intervals(tmp_path, data_root, monkeypatch):
    overrides = quick_overrides("fashion_mnist", data_root)
    overrides.remove("callbacks.progress_bar=null")  # the default recipe's bar, drawn as on a terminal
    monkeypatch.setattr(Console, "is_terminal", property(lambda console: True))
    reads, per_step, trainer = fit_counting_reads(tmp_path, overrides)
    assert_quiet_steps_read_nothing(reads, per_step)
    assert reads.count(0) > 0  # the logging step reads its loss
    assert isinstance(trainer.progress_bar_callback, ProgressBar)
    shown = trainer.progress_bar_callback.get_metrics(trainer, trainer.lightning_module)
    assert shown["train/loss_step"] == pytest.approx(float(trainer.lightning_module.step_loss))


def test_training_steps_of_a_model_with_several_heads_read_nothing_between_logging_intervals(
    tmp_path, catalogue_export
):
    reads, per_step, _ = fit_counting_reads(tmp_path, catalogue_overrides(catalogue_export))
    assert_quiet_steps_read_nothing(reads, per_step)


@pytest.mark.gpu
def test_training_steps_on_a_gpu_never_wait_for_it_between_logging_intervals(tmp_path, data_root):
    overrides = [o for o in quick_overrides("fashion_mnist", data_root) if o != "trainer.accelerator=cpu"]
    overrides.append("trainer.accelerator=gpu")
    try:
        reads, per_step, _ = fit_counting_reads(tmp_path, overrides, [SyncsAreErrors()])
    finally:  # a failed fit leaves the rest of the session as it was
        torch.cuda.set_sync_debug_mode("default")
    assert_quiet_steps_read_nothing(reads, per_step)


def test_the_trainer_profiles_nothing_at_no_cost_unless_a_profiler_is_chosen(tmp_path):
    """Lightning wraps every hook call in its profiler's context manager, even its default one that records
    nothing: skuvision's default hands back one shared no-op context; a chosen profiler is Lightning's."""
    from pytorch_lightning.profilers import SimpleProfiler

    from skuvision.callbacks import NoProfiler

    trainer = build_trainer(compose_cfg("train", quick_overrides("fashion_mnist", tmp_path), tmp_path / "a"))
    assert isinstance(trainer.profiler, NoProfiler)
    assert trainer.profiler.profile("a") is trainer.profiler.profile("b")
    with trainer.profiler.profile("[Callback]x.on_train_batch_end"):
        pass
    chosen = compose_cfg(
        "train", [*quick_overrides("fashion_mnist", tmp_path), "+trainer.profiler=simple"], tmp_path / "b"
    )
    assert isinstance(build_trainer(chosen).profiler, SimpleProfiler)
