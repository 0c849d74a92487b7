"""The commands: one Hydra entry point per task over the configs in skuvision.conf.

The console scripts (skuvision-train, skuvision-eval, ...) and the root shims (train.py, eval.py, ...) both
call these. Each imports its task when it runs, so a command loads only its own task's libraries (serve and
demo bring in LitServe and Gradio; train does not need them), and a mistake in the config (an unknown option,
a renamed key, a mandatory key the task reads first) is answered before torch is loaded. A script that calls
`serve` needs the `if __name__ == "__main__":` guard: LitServe's workers are new processes that import the
script again.
"""

from __future__ import annotations

import importlib
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from skuvision.compat import lightning_logs_on_stderr, quiet_known_noise
from skuvision.config import CONF_PACKAGE, renamed_key_error
from skuvision.tasks.utils import run_cli


def entry_point(name: str, task: str, doc: str, returns=None, reads_first: str | None = None):
    """The command `name`: conf/<name>.yaml composed with the command line, then `task` ("module:function"
    below skuvision.tasks) run through run_cli. `returns(result, cfg)`: what the command hands Hydra.
    `reads_first`: a mandatory key the task reads before any other check, read here before the task's
    libraries are imported (the same one-line error when it is not set, without torch's start-up)."""
    module, function = task.split(":")

    def imported_task(cfg: DictConfig):
        if reads_first:
            OmegaConf.select(cfg, reads_first, throw_on_missing=True)
        return getattr(importlib.import_module(f"skuvision.tasks.{module}"), function)(cfg)

    def run(cfg: DictConfig):
        quiet_known_noise()
        lightning_logs_on_stderr()
        result = run_cli(imported_task, cfg)
        return returns(result, cfg) if returns else None

    # Hydra names a job after its function's module: each command's job keeps the name the root shims gave
    # it (train, eval, ...), which is the SLURM job's name and in .hydra/hydra.yaml.
    run.__module__ = f"{__name__}.{name}"
    run.__doc__ = doc
    return hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name=name)(run)


def optimized_metric(metrics: dict | None, cfg: DictConfig) -> float | None:
    """What an Optuna sweep optimizes; a failed job gives None, which Optuna records as a failed trial."""
    return metrics.get(cfg.optimized_metric) if metrics else None


_train = entry_point("train", "train:train", "Train, test, write metrics.json.", returns=optimized_metric)


def train() -> None:
    """Train, test the chosen checkpoint, write metrics.json (old key names refused first, in one line)."""
    if error := renamed_key_error(sys.argv[1:]):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    _train()


# reads_first: eval and audit resolve ckpt_path before any other check.
evaluate = entry_point(
    "eval", "evaluate:evaluate", "Test a checkpoint and write metrics.json.", reads_first="ckpt_path"
)
predict = entry_point("predict", "predict:predict", "Top-k labels per image into a CSV.")
embed = entry_point("embed", "embed:embed", "Features, nearest neighbours and the catalogue index.")
export = entry_point("export", "export:export", "ONNX or timm's format, checked against PyTorch.")
serve = entry_point("serve", "serve:serve", "The HTTP API and the demo page.")
demo = entry_point("demo", "serve:demo", "The demo page alone (Gradio, model in this process).")
audit = entry_point(
    "audit",
    "audit:audit",
    "Likely label errors, duplicates and leakage, image quality.",
    reads_first="ckpt_path",
)
compare = entry_point("compare", "compare:compare", "A multirun's leaderboard (.md, .csv, .png).")
shard = entry_point("shard", "shard:shard", "litdata shards of a file source for data=streaming.")
