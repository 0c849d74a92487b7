"""Fine-tuning strategies: which stages train at each epoch, and each parameter's LR scale.

A strategy is a Lightning callback the Classifier adds for itself (`configure_callbacks`). It freezes with
`requires_grad=False` (frozen weights get no gradient, so no optimizer step or weight decay touches them) and
puts the BatchNorm layers of frozen stages in eval mode (running statistics stay as they are) unless
`train_bn` is set. Its state, the frozen stages, is saved in the checkpoint; on resume it is derived again
from the epoch, so a resumed run freezes exactly what an uninterrupted one would.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from pytorch_lightning import Callback, LightningModule, Trainer
from timm.optim import param_groups_layer_decay
from torch import nn

from skuvision.errors import SkuvisionError
from skuvision.finetune.groups import build_param_groups, stage_param_names

log = logging.getLogger(__name__)

# torch's public BatchNorm classes (timm's BatchNormAct2d and the lazy variants subclass them).
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


class FinetuneStrategy(Callback):
    """Base strategy: every stage trains; the head's LR is `head_lr_scale` x the base LR."""

    def __init__(self, head_lr_scale: float = 1.0, train_bn: bool = False):
        self.head_lr_scale = float(head_lr_scale)
        self.train_bn = bool(train_bn)
        self.frozen: list[int] = []  # stage indices frozen now (the head is the last stage)

    # --- what each strategy decides ------------------------------------------------------------------
    def frozen_stages(self, epoch: int, num_stages: int) -> list[int]:
        """Stage indices that do not train during `epoch` (0-based); the head is stage num_stages - 1."""
        return []

    def lr_scales(self, backbone: nn.Module, stages: list[list[str]]) -> dict[str, float]:
        """LR multiplier per parameter name (missing: 1.0)."""
        return {name: self.head_lr_scale for name in stages[-1]}

    # --- shared ---------------------------------------------------------------------------------------
    def param_groups(self, backbone: nn.Module, lr: float, weight_decay: float) -> list[dict]:
        scales = self.lr_scales(backbone, stage_param_names(backbone))
        return build_param_groups(backbone, lr, weight_decay, scales)

    def apply(self, backbone: nn.Module, epoch: int) -> None:
        """Set requires_grad and BatchNorm modes for `epoch`."""
        stages = stage_param_names(backbone)
        frozen = sorted(self.frozen_stages(epoch, len(stages)))
        if frozen != self.frozen:
            log.info("epoch %d: frozen stages %s (head = stage %d)", epoch, frozen, len(stages) - 1)
        self.frozen = frozen
        frozen_names = {name for stage in frozen for name in stages[stage]}
        for name, param in backbone.named_parameters():
            param.requires_grad = name not in frozen_names
        frozen_bn = set(frozen_batchnorms(backbone, frozen_names))
        for module in backbone.modules():
            if isinstance(module, BATCH_NORMS):
                module.train(self.train_bn if module in frozen_bn else backbone.training)

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(pl_module.backbone, trainer.current_epoch)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.apply(pl_module.backbone, trainer.current_epoch)
        if trainer.world_size > 1:
            check_ranks_agree(trainer, pl_module.backbone)

    def state_dict(self) -> dict:
        return {"frozen": list(self.frozen)}

    def load_state_dict(self, state_dict: dict) -> None:
        self.frozen = list(state_dict.get("frozen", []))


def check_ranks_agree(trainer: Trainer, backbone: nn.Module) -> None:
    """Under DDP every rank must freeze the same parameters, or gradient all-reduce hangs or mixes."""
    flags = torch.tensor([p.requires_grad for p in backbone.parameters()], dtype=torch.int32)
    gathered = trainer.strategy.all_gather(flags.to(trainer.strategy.root_device))
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("DDP ranks disagree on which parameters are frozen")


def frozen_batchnorms(backbone: nn.Module, frozen_names: set[str]) -> list[nn.Module]:
    """BatchNorm layers whose parameters are all frozen."""
    found = []
    for module_name, module in backbone.named_modules():
        if isinstance(module, BATCH_NORMS):
            names = {f"{module_name}.{n}" for n, _ in module.named_parameters()}
            if names and names <= frozen_names:
                found.append(module)
    return found


class Full(FinetuneStrategy):
    """Everything trains from the first step."""


class LinearProbe(FinetuneStrategy):
    """Only the head trains; the backbone, its BatchNorm statistics included, stays as loaded."""

    def frozen_stages(self, epoch: int, num_stages: int) -> list[int]:
        return list(range(num_stages - 1))


class FreezeStages(FinetuneStrategy):
    """The first `num_frozen` stages (stem first) stay frozen for the whole run."""

    def __init__(self, num_frozen: int = 2, **kwargs):
        super().__init__(**kwargs)
        self.num_frozen = int(num_frozen)

    def frozen_stages(self, epoch: int, num_stages: int) -> list[int]:
        return list(range(min(self.num_frozen, num_stages - 1)))


class Gradual(FinetuneStrategy):
    """Head first; at each epoch in `unfreeze_at`, the next stage from the top starts training.

    The last milestone unfreezes everything still frozen, so `unfreeze_at=[1]` is fastai's
    `fine_tune(freeze_epochs=1)`: one epoch of the head alone, then the whole network.
    """

    def __init__(self, unfreeze_at: Sequence[int] = (1, 2, 3), **kwargs):
        super().__init__(**kwargs)
        self.unfreeze_at = sorted(int(e) for e in unfreeze_at)
        if not self.unfreeze_at or self.unfreeze_at[0] < 0:
            raise SkuvisionError(
                f"finetune.unfreeze_at={list(unfreeze_at)}: give one or more epochs >= 0, e.g. [1,2,3]"
            )

    def frozen_stages(self, epoch: int, num_stages: int) -> list[int]:
        passed = sum(epoch >= milestone for milestone in self.unfreeze_at)
        if passed >= len(self.unfreeze_at):
            return []
        body = num_stages - 1  # stages below the head
        return list(range(max(0, body - passed)))


class Discriminative(FinetuneStrategy):
    """Everything trains; LRs decay layer by layer from the head (timm's param_groups_layer_decay).

    A layer `d` layers below the head trains at base LR x layer_decay**d; the head at the base LR.
    """

    def __init__(self, layer_decay: float = 0.7, **kwargs):
        super().__init__(**kwargs)
        self.layer_decay = float(layer_decay)

    def lr_scales(self, backbone: nn.Module, stages: list[list[str]]) -> dict[str, float]:
        # timm skips parameters that do not require grad; the scales must not depend on what is frozen now.
        flags = {name: p.requires_grad for name, p in backbone.named_parameters()}
        backbone.requires_grad_(True)
        try:
            groups = param_groups_layer_decay(backbone, weight_decay=0.0, layer_decay=self.layer_decay)
        finally:
            for name, p in backbone.named_parameters():
                p.requires_grad = flags[name]
        ids = {id(p): name for name, p in backbone.named_parameters()}
        scales = {ids[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}
        head_scale = max(scales.values())
        return {
            name: scale / head_scale * (self.head_lr_scale if name in stages[-1] else 1.0)
            for name, scale in scales.items()
        }
