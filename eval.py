"""python eval.py ckpt_path=...: test a checkpoint and write metrics.json into a new run folder."""

from skuvision.cli import evaluate

if __name__ == "__main__":
    evaluate()
