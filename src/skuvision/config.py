"""OmegaConf resolvers the configs use; registered on import of skuvision."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf


def cache_dir() -> Path:
    """Where converted weights and image-scan results are kept ($SKUVISION_CACHE or ~/.cache/skuvision)."""
    return Path(os.environ.get("SKUVISION_CACHE", Path.home() / ".cache" / "skuvision"))


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is configured (env var or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc):
        with open(netrc) as f:
            return "api.wandb.ai" not in f.read()
    return True


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where the hardware runs bf16 natively, else 16-mixed on a GPU and 32 on a CPU.

    On CPUs with AVX512-BF16 or AMX, bf16 autocast about doubles training speed; elsewhere it is emulated
    and slower than float32.
    """
    import torch

    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    native = [
        getattr(torch.cpu, f, lambda: False)()
        for f in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    return "bf16-mixed" if any(native) else "32"


RESOLVERS = {"skuvision.wandb_offline": wandb_offline, "skuvision.auto_precision": auto_precision}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
