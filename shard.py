"""python shard.py data=image_folder data.root=... output=...: litdata shards of a file source for
data=streaming (a folder or s3://bucket/prefix)."""

from skuvision.cli import shard

if __name__ == "__main__":
    shard()
