"""python predict.py ckpt_path=... input=<folder|image|list file>: top-k labels per image into a CSV."""

from skuvision.cli import predict

if __name__ == "__main__":
    predict()
