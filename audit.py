"""python audit.py ckpt_path=...: likely label errors, duplicates and leakage, image quality, class counts."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.audit import audit
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="audit")
def main(cfg: DictConfig) -> None:
    run_cli(audit, cfg)


if __name__ == "__main__":
    main()
