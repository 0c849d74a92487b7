"""python train.py [group=option ...] [key=value ...]: train, test the best checkpoint, write metrics.json."""

import sys

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.config import renamed_key_error
from skuvision.tasks import train
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = run_cli(train, cfg)
    # What an Optuna sweep optimizes. A failed job returns None, which Optuna records as a failed trial.
    return metrics.get(cfg.optimized_metric) if metrics else None


if __name__ == "__main__":
    if error := renamed_key_error(sys.argv[1:]):
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
