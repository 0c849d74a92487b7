"""python embed.py ckpt_path=... [split=test | input=...] [query=...]: features and nearest neighbours."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.embed import embed
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="embed")
def main(cfg: DictConfig) -> None:
    run_cli(embed, cfg)


if __name__ == "__main__":
    main()
