"""Progress bars only on a terminal: elsewhere (a log file, CI, a batch job) one plain line per epoch, and
every task's Trainer gets that bar."""

import contextlib
import io
import logging
import re

import pytest
import rich
import torch
from pytorch_lightning import LightningModule, Trainer
from torch.utils.data import DataLoader, TensorDataset

from skuvision.assembly import build, build_trainer
from skuvision.callbacks import ProgressBar


class Tiny(LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).sum()

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", float(self.current_epoch), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.fixture
def default_console():
    yield
    rich.reconfigure()  # the bar reconfigures rich's global console with its console_kwargs


def fit(bar: ProgressBar) -> str:
    """Two epochs (after a sanity check) with `bar`; what went to stdout."""
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=2,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
        num_sanity_val_steps=1,
    )
    with contextlib.redirect_stdout(io.StringIO()) as out:
        trainer.fit(Tiny(), train_dataloaders=data, val_dataloaders=data)
    return out.getvalue()


def test_off_a_terminal_the_bar_is_one_line_per_epoch(default_console):
    assert fit(ProgressBar()).splitlines() == ["epoch 1/2  val/acc 0", "epoch 2/2  val/acc 1"]


def test_on_a_terminal_the_bar_is_drawn_as_before(default_console):
    terminal = io.StringIO()
    printed = fit(ProgressBar(console_kwargs={"force_terminal": True, "file": terminal, "width": 100}))
    assert printed == ""
    drawn = terminal.getvalue()
    assert "Epoch 1/1" in drawn and "━" in drawn and "\r" in drawn


def test_every_tasks_trainer_gets_that_bar_unless_it_is_switched_off(train_cfg):
    cfg = train_cfg()
    assert isinstance(build_trainer(cfg).progress_bar_callback, ProgressBar)
    assert build_trainer(cfg, enable_progress_bar=False).progress_bar_callback is None


def test_a_second_predict_of_one_trainer_logs_no_callback_swap(train_cfg):
    """The finetune strategy is the model's callback: offered again to the Trainer that holds it, Lightning
    would log that it replaces itself."""
    datamodule, module = build(train_cfg())
    trainer = build_trainer(train_cfg(), limit_predict_batches=1, enable_progress_bar=False)
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    lightning_log = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning_log.addHandler(handler)
    try:
        trainer.predict(module, datamodule=datamodule)
        trainer.predict(module, datamodule=datamodule)
    finally:
        lightning_log.removeHandler(handler)
    assert not [line for line in lines if "override existing callbacks" in line], lines
    assert trainer.callbacks.count(module.finetune) == 1


def test_on_a_terminal_the_bar_shows_images_a_second_of_each_epoch_and_of_predict(default_console):
    class Counted(Tiny):
        def predict_step(self, batch, batch_idx):
            return self.layer(batch[0])

    terminal = io.StringIO()
    bar = ProgressBar(console_kwargs={"force_terminal": True, "file": terminal, "width": 140})
    fit(bar)
    train_task = next(t for t in bar.progress.tasks if t.id == bar.train_progress_bar_id)
    assert train_task.fields["images"] == 8  # the second epoch's 8 images, not both epochs' 16
    trainer = bar.trainer
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.predict(Counted(), DataLoader(TensorDataset(torch.randn(7, 4)), batch_size=3))
    drawn = terminal.getvalue()
    assert re.search(r"\d+\.\d img/s", drawn), drawn[-300:]
    predict_task = next(t for t in bar.progress.tasks if t.id == bar.predict_progress_bar_id)
    assert predict_task.fields["images"] == 7  # batches of 3, 3 and 1
