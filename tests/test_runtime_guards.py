"""The behaviours of Lightning and torch that skuvision.runtime_guards works around, at the versions named
there. A failure here means the behaviour changed: adapt or drop the workaround, then this test."""

import csv

import pytest
import torch
from omegaconf import OmegaConf
from pytorch_lightning.loggers import CSVLogger

from skuvision.finetune import Full, Gradual
from skuvision.models import create_backbone
from skuvision.runtime_guards import (
    NATIVE_BF16_CHECKS,
    continue_csv_logs,
    cpu_has_native_bf16,
    ddp_strategy,
    keep_earlier_csv_rows,
)


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


def test_ddp_finds_unused_parameters_only_when_stages_freeze():
    backbone = create_backbone("simple_cnn", num_classes=3, in_chans=1)
    trainer = OmegaConf.create({"strategy": "ddp_spawn", "max_epochs": 3})
    assert ddp_strategy(trainer, Full(), backbone) == "ddp_spawn"
    assert (
        ddp_strategy(trainer, Gradual(unfreeze_at=[1]), backbone) == "ddp_spawn_find_unused_parameters_true"
    )
    assert ddp_strategy(OmegaConf.create({"strategy": "auto"}), Gradual(), backbone) == "auto"
