"""python train.py [group=option ...] [key=value ...]: train, test the best checkpoint, write metrics.json."""

from skuvision.cli import train

if __name__ == "__main__":
    train()
