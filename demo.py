"""python demo.py ckpt_path=... [index=<embed run>]: the demo page alone (Gradio, model in this process)."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.serve import demo
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="demo")
def main(cfg: DictConfig) -> None:
    run_cli(demo, cfg)


if __name__ == "__main__":
    main()
