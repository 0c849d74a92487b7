"""python predict.py ckpt_path=... input=<folder|image|list file>: top-k labels per image into a CSV."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.predict import predict
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli(predict, cfg)


if __name__ == "__main__":
    main()
