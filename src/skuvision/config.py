"""OmegaConf resolvers the configs use; registered on import of skuvision."""

from __future__ import annotations

import os

from omegaconf import OmegaConf


def wandb_offline() -> bool:
    """W&B runs offline unless an API key is configured (env var or `wandb login`'s netrc entry)."""
    if os.environ.get("WANDB_API_KEY"):
        return False
    netrc = os.path.expanduser("~/.netrc")
    if os.path.isfile(netrc):
        with open(netrc) as f:
            return "api.wandb.ai" not in f.read()
    return True


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("skuvision.wandb_offline"):
        OmegaConf.register_new_resolver("skuvision.wandb_offline", wandb_offline)
