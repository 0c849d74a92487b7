"""OmegaConf resolvers the configs use; registered on import of skuvision."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

# The Hydra configs: the package skuvision.conf, which is conf/ at the root of a checkout (src/skuvision/conf
# links there) and a folder inside an installed wheel. Resolved, so messages name the real folder.
CONF_DIR = (Path(__file__).parent / "conf").resolve()
# The same folder as a Hydra config source, for @hydra.main wherever skuvision is installed.
CONF_PACKAGE = "pkg://skuvision.conf"


def plain(cfg: Any) -> Any:
    """A resolved OmegaConf node as plain dicts and lists (safe for checkpoints and loggers)."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def set_threads(threads: int | None) -> None:
    """The task's `threads` setting: torch's intra-op threads (None or 0: torch's default)."""
    if threads:
        import torch

        torch.set_num_threads(int(threads))


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


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra multirun (-m)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group() -> str | None:
    """The sweep folder of a multirun job (its W&B group); None for a single run."""
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().sweep.dir) if in_multirun() else None


def auto_precision(accelerator: str = "auto") -> str:
    """bf16-mixed where the hardware runs bf16 natively, else 16-mixed on a GPU and 32 on a CPU.

    On CPUs with AVX512-BF16 or AMX, bf16 autocast about doubles training speed; elsewhere it is emulated
    and slower than float32.
    """
    import torch

    from skuvision.compat import cpu_has_native_bf16

    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if use_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"


# Keys that moved, and where to: a command line that uses the old name gets one line naming the new one.
RENAMED_KEYS = {
    f"data.{key}": f"input.{key}" for key in ("image_size", "mean", "std", "interpolation", "crop_pct")
}


def renamed_key_error(overrides: list[str]) -> str | None:
    """The error line for the first override that uses a renamed key, else None."""
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in RENAMED_KEYS:
            return f"{key} is now {RENAMED_KEYS[key]}: write {override.replace(key, RENAMED_KEYS[key], 1)}"
    return None


def own_keys(config_name: str) -> str:
    """For --help: the keys conf/<config_name>.yaml sets itself (after its defaults list, before its hydra:
    block), with their comments, as written there; a config built on another task's (demo on serve) shows
    that one's first. `$` doubled: Hydra fills the help template with string.Template."""
    path = CONF_DIR / f"{config_name}.yaml"
    if not path.is_file():
        return ""
    lines, body, based_on = [], False, []
    for line in path.read_text().splitlines():
        if line.startswith("hydra:") or (body and line.startswith("# The run folder must be new")):
            break
        if body and not line.startswith("task_name:"):
            lines.append(line)
        elif line.strip() == "- _self_":
            body = True
        elif not body and line.startswith("  - ") and (CONF_DIR / f"{line[4:].strip()}.yaml").is_file():
            based_on.append(own_keys(line[4:].strip()))
    own = "\n".join(lines).strip("\n").replace("$", "$$")
    return "\n".join([*based_on, f"# {config_name}.yaml sets:\n{own}" if based_on else own])


RESOLVERS = {
    "skuvision.own_keys": own_keys,
    "skuvision.wandb_offline": wandb_offline,
    "skuvision.auto_precision": auto_precision,
    "skuvision.sweep_group": sweep_group,
}


def register_resolvers() -> None:
    for name, fn in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


def compose_config(config_name: str, overrides: list[str], output_dir: Path) -> DictConfig:
    """Compose conf/<config_name>.yaml with overrides as train.py/eval.py would, with the run folder at
    output_dir: for notebooks, tests and benchmarks that call the tasks without the command line."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    return cfg
