"""python compare.py sweep_dir=multirun/...: a multirun's leaderboard (.md, .csv, .png in that folder)."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks import compare
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    run_cli(compare, cfg)


if __name__ == "__main__":
    main()
