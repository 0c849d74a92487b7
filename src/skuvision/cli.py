"""The commands: one function per task, each a Hydra entry point over the configs in skuvision.conf.

The console scripts (skuvision-train, skuvision-eval, ...) and the root shims (train.py, eval.py, ...) both
call these. Each imports its task when it runs, so a command loads only its own task's libraries (serve and
demo bring in LitServe and Gradio; train does not need them).
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from skuvision.config import CONF_PACKAGE, renamed_key_error
from skuvision.tasks.utils import run_cli


def job_name(name: str):
    """Hydra names a job after its function's module (for a script, its file): these functions share one
    module, so each gets its command's name (train, eval, ...), as the root shims' jobs had: the SLURM job's
    name, in .hydra/hydra.yaml."""

    def named(task_function):
        task_function.__module__ = f"{__name__}.{name}"
        return task_function

    return named


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="train")
@job_name("train")
def _train(cfg: DictConfig) -> float | None:
    from skuvision.tasks import train as train_task

    metrics = run_cli(train_task, cfg)
    # What an Optuna sweep optimizes. A failed job returns None, which Optuna records as a failed trial.
    return metrics.get(cfg.optimized_metric) if metrics else None


def train() -> None:
    """Train, test the best checkpoint, write metrics.json."""
    if error := renamed_key_error(sys.argv[1:]):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    _train()


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="eval")
@job_name("eval")
def evaluate(cfg: DictConfig) -> None:
    """Test a checkpoint and write metrics.json into a new run folder."""
    from skuvision.tasks import evaluate as evaluate_task

    run_cli(evaluate_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="predict")
@job_name("predict")
def predict(cfg: DictConfig) -> None:
    """Top-k labels per image into a CSV."""
    from skuvision.tasks.predict import predict as predict_task

    run_cli(predict_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="embed")
@job_name("embed")
def embed(cfg: DictConfig) -> None:
    """Features and nearest neighbours."""
    from skuvision.tasks.embed import embed as embed_task

    run_cli(embed_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="export")
@job_name("export")
def export(cfg: DictConfig) -> None:
    """ONNX with a dynamic batch, checked against PyTorch with onnxruntime."""
    from skuvision.tasks.export import export as export_task

    run_cli(export_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="serve")
@job_name("serve")
def serve(cfg: DictConfig) -> None:
    """The HTTP API and the demo page. A script calling this needs the `if __name__ == "__main__":` guard:
    LitServe's workers are new processes that import the script again."""
    from skuvision.tasks.serve import serve as serve_task

    run_cli(serve_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="demo")
@job_name("demo")
def demo(cfg: DictConfig) -> None:
    """The demo page alone (Gradio, model in this process)."""
    from skuvision.tasks.serve import demo as demo_task

    run_cli(demo_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="audit")
@job_name("audit")
def audit(cfg: DictConfig) -> None:
    """Likely label errors, duplicates and leakage, image quality, class counts."""
    from skuvision.tasks.audit import audit as audit_task

    run_cli(audit_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="compare")
@job_name("compare")
def compare(cfg: DictConfig) -> None:
    """A multirun's leaderboard (.md, .csv, .png in its folder)."""
    from skuvision.tasks import compare as compare_task

    run_cli(compare_task, cfg)


@hydra.main(version_base="1.3", config_path=CONF_PACKAGE, config_name="shard")
@job_name("shard")
def shard(cfg: DictConfig) -> None:
    """litdata shards of a file source for data=streaming (a folder or s3://bucket/prefix)."""
    from skuvision.tasks.shard import shard as shard_task

    run_cli(shard_task, cfg)
