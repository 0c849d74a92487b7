from skuvision.tasks.compare import compare
from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.shard import shard
from skuvision.tasks.train import train

__all__ = ["compare", "evaluate", "shard", "train"]
