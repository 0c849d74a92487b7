from skuvision.tasks.evaluate import evaluate
from skuvision.tasks.train import train

__all__ = ["evaluate", "train"]
