"""python shard.py data=image_folder data.root=... output=...: litdata shards of a file source for
data=streaming (a folder or s3://bucket/prefix)."""

import hydra
from omegaconf import DictConfig

import skuvision  # noqa: F401  (registers config resolvers)
from skuvision.tasks.shard import shard
from skuvision.tasks.utils import run_cli


@hydra.main(version_base="1.3", config_path="conf", config_name="shard")
def main(cfg: DictConfig) -> None:
    run_cli(shard, cfg)


if __name__ == "__main__":
    main()
