"""python audit.py ckpt_path=...: likely label errors, duplicates and leakage, image quality, class counts."""

from skuvision.cli import audit

if __name__ == "__main__":
    audit()
