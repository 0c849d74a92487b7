"""The LightningModule: a timm backbone with a new head, cross-entropy, and torchmetrics per stage.

Only plain config values are saved as hyperparameters, so checkpoints load with weights_only=True and
`skuvision.checkpoints.load_classifier(path)` rebuilds the model without any weights download.
"""

from __future__ import annotations

import inspect
import random
from typing import Any

import numpy as np
import torch
from hydra.utils import get_object, instantiate
from pytorch_lightning import LightningModule
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.trainer.states import TrainerFn
from timm.loss import SoftTargetCrossEntropy
from torch import nn
from torchmetrics import MaxMetric, MeanMetric, MetricCollection

from skuvision.errors import SkuvisionError
from skuvision.finetune import FinetuneStrategy, Full
from skuvision.metrics import MistakeSeverity, classification_metrics, eval_loss, tag_metrics
from skuvision.models.heads import MISSING, Head, HeadLosses, MultiHead, heads_from_specs, replace_classifier
from skuvision.tta import check_tta, tta_logits


class Classifier(LightningModule):
    def __init__(
        self,
        model: dict,
        input_config: dict,
        num_classes: int,
        in_chans: int,
        class_names: list[str],
        optimizer: dict,
        scheduler: dict | None = None,
        finetune: dict | None = None,
        label_smoothing: float = 0.0,
        class_weights: list[float] | dict[str, list[float]] | None = None,
        data: dict | None = None,
        tta: str = "none",
        load_pretrained: bool = True,
        heads: list[dict] | None = None,
        tag_loss: str = "bce",
    ):
        """`model`: a conf/model config (its `_target_` builds the backbone); `input_config`: what
        `resolve_input` gave for it, which the data module was built with too; `finetune`: a conf/finetune
        config (default: everything trains); `data`: the data config, kept so evaluation and prediction can
        rebuild the same splits; `tta`: test-time augmentation of test and predict (skuvision.tta);
        `load_pretrained=False` skips the weights download when a checkpoint's state dict replaces them
        anyway. `heads`: one spec per label or tag column (skuvision.models.heads) for a table with several;
        None is the one-label model (`class_names`), whose outputs, metrics and checkpoints keep their shape.
        `class_weights` is then {column: weights}; `tag_loss`: bce or asl."""
        super().__init__()
        if len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.save_hyperparameters()
        no_weights = {} if load_pretrained else {"pretrained": False, "weights": None}
        self.backbone = instantiate(
            model, num_classes=num_classes, in_chans=in_chans, **no_weights, _convert_="all"
        )
        self.channels_last = bool(model.get("channels_last", False))
        self.finetune: FinetuneStrategy = instantiate(finetune) if finetune else Full()
        self.multi_head: MultiHead | None = None
        if heads:
            self.multi_head = replace_classifier(self.backbone, heads_from_specs(heads))
            self.criterion = HeadLosses(self.multi_head.heads, label_smoothing, class_weights, tag_loss)
            for stage in ("train", "val", "test"):
                setattr(self, f"{stage}_metrics", head_metric_collections(self.multi_head.heads, stage))
        else:
            weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights else None
            # Training's loss; val/test report plain cross-entropy (`eval_loss`), as eval.py does.
            self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
            self.soft_criterion = SoftTargetCrossEntropy()
            metrics = classification_metrics(num_classes)
            # Accuracy alone in training: top-5 and macro F1 cost as much as the rest of the framework's
            # work in a small net's step, and val/test report them.
            self.train_metrics = MetricCollection({"acc": metrics["acc"]}).clone(prefix="train/")
            self.val_metrics = metrics.clone(prefix="val/")
            self.test_metrics = metrics.clone(prefix="test/")
        self.step_loss: torch.Tensor | None = None  # the last one logged
        # A NaN training loss shows as NaN: dropping it with a warning reads every step's loss on the host.
        self.train_loss = MeanMetric(nan_strategy="disable")
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        self.val_acc_best = MaxMetric()
        self.predict_embeddings = False  # predict_step returns logits, or features for similarity search
        self.head_alone_matches: bool | None = None  # logits_and_embedding's check, made on its first batch
        self.tta = check_tta(tta)  # eval.py and predict.py may choose another mode than training's test
        self.lr_schedule_steps: int | None = None  # the length of a schedule fixed at the start of a fit
        self.resumed_schedule_steps: int | None = None  # and that of the run a fit resumes

    @property
    def input_config(self) -> dict:
        """What the model expects (size, mean/std, interpolation, crop): the stored hyperparameter."""
        return dict(self.hparams.input_config)

    @property
    def class_names(self) -> list[str]:
        return list(self.hparams.class_names)

    @property
    def heads(self) -> list[Head]:
        """Every output: the columns' heads, or the one-label model's one head (column "")."""
        if self.multi_head is not None:
            return list(self.multi_head.heads)
        return [Head(column="", kind="label", classes=self.class_names)]

    def by_head(self, outputs) -> dict[str, torch.Tensor]:
        """{column: logits} of a forward pass (the one-label model's under "")."""
        return outputs if isinstance(outputs, dict) else {"": outputs}

    def forward(self, images: torch.Tensor):
        """Logits: one tensor, or {column: logits} with several heads (every head, derived ones included)."""
        out = self.forward_trained(images)
        return self.multi_head.complete(out) if self.multi_head is not None else out

    def forward_trained(self, images: torch.Tensor):
        """The backbone's output: with several heads, only the trained ones (what TTA averages)."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone(images)

    def predict_logits(self, images: torch.Tensor, mode: str):
        """The logits test and predict use: the mean over `mode`'s views, derived heads completed after."""
        out = tta_logits(self.forward_trained, images, mode)
        return self.multi_head.complete(out) if self.multi_head is not None else out

    def logits_and_embedding(self, images: torch.Tensor, mode: str) -> tuple:
        """(predict_logits(images, mode), embed(images)) from one backbone pass over the original view: its
        logits are the classifier layer's on the embedding. Checked once per model on its first batch
        against the whole forward (a backbone whose classifier is not the last step of its forward would
        differ); where they differ, each batch runs the forward again."""
        embedding = self.embed(images)
        head_alone = self.backbone.get_classifier()(embedding)
        if self.head_alone_matches is None:
            self.head_alone_matches = same_logits(head_alone, self.forward_trained(images))
        out = tta_logits(
            self.forward_trained, images, mode, first=head_alone if self.head_alone_matches else None
        )
        return (self.multi_head.complete(out) if self.multi_head is not None else out), embedding

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features, the input of the classifier head."""
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.backbone.forward_head(self.backbone.forward_features(images), pre_logits=True)

    def on_train_start(self) -> None:
        # The sanity check must not count towards the best validation accuracy.
        for metrics in self.val_metrics.values() if self.multi_head is not None else [self.val_metrics]:
            metrics.reset()
        self.val_loss.reset()
        self.val_acc_best.reset()

    # Steps only update metrics (cheap tensor ops); values are logged once per epoch. Each self.log call
    # costs about a millisecond in Lightning, which small models on a CPU would feel at every step.
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        if self.multi_head is not None:
            loss = self.criterion(logits, labels)
            self.update_head_metrics("train", logits, labels)
        elif labels.ndim == 2:  # soft targets from Mixup/CutMix; metrics count the dominant class
            loss = self.soft_criterion(logits, labels)
            labels = labels.argmax(dim=1)
        else:
            loss = self.criterion(logits, labels)
        self.train_loss.update(loss.detach())
        if self.multi_head is None:
            self.train_metrics.update(logits.detach(), labels)
        if self.global_step % self.trainer.log_every_n_steps == 0:
            # Not prog_bar=True: Lightning would read it on the host at every batch until the epoch ends.
            self.step_loss = loss.detach()  # callbacks.ProgressBar shows it
            self.log("train/loss_step", self.step_loss, on_step=True, on_epoch=False)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss)
        self.log_stage_metrics("train")

    def _eval_step(self, batch, stage: str) -> None:
        images, labels = batch
        logits = self.predict_logits(images, self.tta) if stage == "test" else self(images)
        if self.multi_head is not None:
            rows = len(images)
            getattr(self, f"{stage}_loss").update(self.criterion(logits, labels).detach(), weight=rows)
            self.update_head_metrics(stage, logits, labels)
            return
        # Weighted by batch size: the mean over images, whatever the last batch's size.
        getattr(self, f"{stage}_loss").update(eval_loss(logits, labels), weight=len(labels))
        getattr(self, f"{stage}_metrics").update(logits, labels)

    def update_head_metrics(self, stage: str, logits: dict, targets: dict) -> None:
        collections = getattr(self, f"{stage}_metrics")
        for head in self.multi_head.heads:
            target = targets[head.column]
            scores = logits[head.column].detach().float()
            if head.kind == "tags":
                scores = scores.sigmoid()  # tag_metrics take probabilities
            collections[head.column].update(scores, target.long())

    def log_stage_metrics(self, stage: str) -> torch.Tensor:
        """Every metric of the stage. With several heads each is `<stage>/<column>/<metric>`, and
        `<stage>/acc` is the mean over heads of each head's accuracy (a tag head's mAP): what checkpoints
        and early stopping monitor."""
        collections = getattr(self, f"{stage}_metrics")
        if self.multi_head is None:
            score = collections["acc"].compute()  # cached: logging the collection does not compute it again
            self.log_dict(collections, prog_bar=stage == "val")
            return score
        scores = []
        for head in self.multi_head.heads:
            values = collections[head.column].compute()
            collections[head.column].reset()
            self.log_dict(values, sync_dist=True)
            scores.append(values[head.key(stage, "map" if head.kind == "tags" else "acc")])
        score = torch.stack(scores).mean()
        self.log(f"{stage}/acc", score, prog_bar=stage == "val", sync_dist=True)
        return score

    def _log_eval_epoch(self, stage: str) -> torch.Tensor:
        self.log(f"{stage}/loss", getattr(self, f"{stage}_loss"))
        return self.log_stage_metrics(stage)

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        score = self._log_eval_epoch("val")
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(score)
            # Equal on every rank (it comes from synced metrics); without sync_dist Lightning warns under DDP.
            self.log("val/acc_best", self.val_acc_best.compute(), prog_bar=True, sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch("test")

    def predict_step(self, batch, batch_idx: int) -> dict:
        """{"outputs": float32 logits, or pre-logit features with `predict_embeddings`, "meta": the batch's
        second item (labels, or per-file errors)}."""
        images, meta = batch if isinstance(batch, (tuple, list)) else (batch, None)
        if self.predict_embeddings:
            return {"outputs": self.embed(images).float(), "meta": meta}
        outputs = self.predict_logits(images, self.tta)
        if isinstance(outputs, dict):
            return {"outputs": {k: v.float() for k, v in outputs.items()}, "meta": meta}
        return {"outputs": outputs.float(), "meta": meta}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states()
        if self.lr_schedule_steps:
            checkpoint["lr_schedule_steps"] = self.lr_schedule_steps
        for logger in self.loggers:
            if isinstance(logger, WandbLogger):  # resuming from this checkpoint continues the same W&B run
                checkpoint["wandb_run_id"] = logger.version

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Resuming a fit continues the random streams (shuffling, dropout, augmentation) where they were,
        # so a resumed run ends exactly where an uninterrupted one does.
        if self._trainer is not None and "rng_states" in checkpoint:
            set_rng_states(checkpoint["rng_states"])
        if self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING:
            self.resumed_schedule_steps = schedule_steps(checkpoint)

    def configure_callbacks(self) -> list:
        # Once attached it stays: offering it again (a second predict of one Trainer) is logged as a swap.
        return [] if self.finetune in self.trainer.callbacks else [self.finetune]

    def check_resumed_schedule(self, interval: str) -> None:
        """A schedule's length is fixed when its run starts (one-cycle's state keeps it): a resumed fit that
        would run longer or shorter would step past its end, or jump along its curve."""
        resumed, total = self.resumed_schedule_steps, self.lr_schedule_steps
        if resumed is None or resumed == total:
            return
        trainer = self.trainer
        by_steps = trainer.max_steps not in (None, -1) and trainer.max_steps == total
        key = "trainer.max_steps" if by_steps else "trainer.max_epochs"
        value = trainer.max_steps if by_steps else trainer.max_epochs
        started = ""
        if not by_steps:
            earlier = resumed / (1 if interval == "epoch" else total / trainer.max_epochs)
            started = f" (trainer.max_epochs={int(earlier)})" if earlier.is_integer() else ""
        raise SkuvisionError(
            f"{key}={value} makes the LR schedule {total} steps long, but {trainer.ckpt_path} resumes a run "
            f"whose schedule was fixed at {resumed} steps when it started{started}: resume with the {key} it "
            "started with, or train longer in a new run folder"
        )

    def configure_optimizers(self) -> Any:
        """Every param group up front (the strategy's stages and LR scales); the scheduler drives them all."""
        opt_cfg = dict(self.hparams.optimizer)
        groups = self.finetune.param_groups(self.backbone, opt_cfg["lr"], opt_cfg.get("weight_decay", 0.0))
        optimizer = instantiate(opt_cfg, params=groups, _convert_="all")
        if not self.hparams.scheduler:
            return optimizer
        sched_cfg = dict(self.hparams.scheduler)
        interval = sched_cfg.pop("interval", "step")
        monitor = sched_cfg.pop("monitor", None)
        total = self.trainer.max_epochs if interval == "epoch" else self.trainer.estimated_stepping_batches
        if "total_steps" in inspect.signature(get_object(sched_cfg["_target_"])).parameters:
            sched_cfg["total_steps"] = self.lr_schedule_steps = int(total)
            self.check_resumed_schedule(interval)
        scheduler = instantiate(sched_cfg, optimizer=optimizer)
        lr_scheduler = {"scheduler": scheduler, "interval": interval}
        if monitor:
            lr_scheduler["monitor"] = monitor
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}


def same_logits(a, b) -> bool:
    """Whether two forwards' logits (tensors, or {column: tensor}) agree to float rounding."""
    pairs = [(a[k], b[k]) for k in b] if isinstance(b, dict) else [(a, b)]
    return all(torch.allclose(x.float(), y.float(), rtol=1e-3, atol=1e-4) for x, y in pairs)


def head_metric_collections(heads: list[Head], stage: str) -> nn.ModuleDict:
    """{column: the head's torchmetrics, prefixed `<stage>/<column>/`}: a label column's leave out rows
    without a value; a head that coarser levels are read off also reports its mistakes' severity."""
    collections = {}
    for head in heads:
        if head.kind == "tags":
            metrics = tag_metrics(len(head.classes))
        else:
            metrics = classification_metrics(len(head.classes), MISSING)
            coarser = sorted((h for h in heads if h.source == head.column), key=lambda h: -len(h.classes))
            if coarser:
                metrics.add_metrics(
                    {"mistake_severity": MistakeSeverity([h.parents for h in coarser], MISSING)}
                )
        collections[head.column] = metrics.clone(prefix=head.key(stage, ""))
    return nn.ModuleDict(collections)


def schedule_steps(checkpoint: dict) -> int | None:
    """The length of the LR schedule a checkpoint's run was started with; checkpoints of earlier versions
    have it only in a one-cycle schedule's state."""
    if "lr_schedule_steps" in checkpoint:
        return int(checkpoint["lr_schedule_steps"])
    states = checkpoint.get("lr_schedulers") or [{}]
    return states[0].get("total_steps")


def rng_states() -> dict:
    """torch, numpy and Python random states as checkpoint-safe values (weights_only loading accepts them)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
