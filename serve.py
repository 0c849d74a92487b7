"""python serve.py ckpt_path=... [index=<embed run>] [serve.port=8000]: the HTTP API and the demo page."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.serve import serve
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    run_cli(serve, cfg)


# LitServe starts its workers as new processes, which import this file again: they must not start a server.
if __name__ == "__main__":
    main()
