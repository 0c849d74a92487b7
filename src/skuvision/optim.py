"""LR schedules that scale every param group's own LR, so the ratios between groups hold."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR


def one_cycle(
    optimizer: Optimizer,
    total_steps: int,
    pct_start: float = 0.25,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> LRScheduler:
    """OneCycle peaking at each group's configured LR."""
    if pct_start * total_steps == 1:  # torch divides by pct_start * total_steps - 1
        pct_start = 2 / total_steps
    return OneCycleLR(
        optimizer,
        max_lr=[group["lr"] for group in optimizer.param_groups],
        total_steps=total_steps,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
    )


def warmup_cosine(
    optimizer: Optimizer, total_steps: int, warmup_fraction: float = 0.05, min_lr_ratio: float = 0.01
) -> LRScheduler:
    """Linear warmup, then cosine decay to min_lr_ratio x each group's LR."""
    warmup = max(1, round(warmup_fraction * total_steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)
