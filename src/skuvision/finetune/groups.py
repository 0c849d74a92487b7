"""Optimizer param groups over a timm backbone's stages, all built before training starts.

Stages come from timm's `group_matcher(coarse=True)`: stem, blocks/stages, and last the head (classifier and
what timm groups with it). Every stage gets its parameter groups (weight-decayed weights; norms and biases
without decay) whether or not it trains yet, so freezing never changes the optimizer's groups and every
torch scheduler drives all of them.
"""

from __future__ import annotations

from collections.abc import Mapping

from timm.models import group_parameters
from torch import nn

from skuvision.errors import SkuvisionError


def stage_param_names(model: nn.Module) -> list[list[str]]:
    """Parameter names per stage, input side first; the last stage holds the classifier head."""
    matcher = model.group_matcher(coarse=True)
    stages = [list(names) for names in group_parameters(model, matcher).values()]
    if len(stages) < 2:
        name = type(model).__name__
        raise SkuvisionError(
            f"{name}: timm's group_matcher gives {len(stages)} stage(s), and strategies that freeze or scale "
            "stages need >= 2: use finetune=full, or a model whose group_matcher splits it into stages"
        )
    return stages


def no_weight_decay(name: str, param: nn.Parameter, skip: set[str]) -> bool:
    """timm's rule: 1-d parameters (norms, biases), and those the model lists, get no weight decay."""
    return param.ndim <= 1 or name.endswith(".bias") or name in skip


def build_param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_scales: Mapping[str, float] | None = None,
) -> list[dict]:
    """One group per (stage, lr scale, decay or not), each with `lr` = lr x its scale already applied.

    torch schedulers read every group's own starting LR, so the configured ratios hold under any schedule;
    `lr_scale` is kept on each group for inspection only.
    """
    params = dict(model.named_parameters())
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    groups: dict[tuple, dict] = {}
    for stage, names in enumerate(stage_param_names(model)):
        for name in names:
            scale = float(lr_scales.get(name, 1.0)) if lr_scales else 1.0
            decay = 0.0 if no_weight_decay(name, params[name], skip) else weight_decay
            key = (stage, scale, decay)
            if key not in groups:
                kind = "decay" if decay else "no_decay"
                groups[key] = {
                    "name": f"stage{stage}/{kind}" + (f"/x{scale:.4g}" if scale != 1.0 else ""),
                    "stage": stage,
                    "params": [],
                    "param_names": [],
                    "lr": lr * scale,
                    "lr_scale": scale,
                    "weight_decay": decay,
                }
            groups[key]["params"].append(params[name])
            groups[key]["param_names"].append(name)
    return list(groups.values())
