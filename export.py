"""python export.py ckpt_path=...: ONNX with a dynamic batch, checked against PyTorch with onnxruntime."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.export import export
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(export, cfg)


if __name__ == "__main__":
    main()
